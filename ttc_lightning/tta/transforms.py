"""Invertible test-time transforms: the :class:`Transform` base class and the built-in transforms.

A :class:`Transform` has a finite tuple of parameters, identity first. Names and aliases live in
:mod:`ttc_lightning.tta.registry`; the views a list of transforms expands into in :mod:`ttc_lightning.tta.views`.
"""

import math
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor
from typing_extensions import override

from ttc_lightning.checks import check_unused
from ttc_lightning.tta import functional as F
from ttc_lightning.tta.functional import Size
from ttc_lightning.tta.params import check_interpolation, numbers, sequence, size_pair, with_identity


class Transform:
    """Base class of test-time transforms.

    Subclasses set ``params`` (identity first) and implement :meth:`augment`. A transform that moves pixels
    (``spatial = True``) implements :meth:`deaugment` to map dense outputs (masks, logits maps) back and
    :meth:`deaugment_points` to map coordinates back; leaving either out marks it as having no inverse for tasks
    that need one. Register a subclass under a name with :func:`register_transform`.

    Example::

        @ttc.register_transform("roll")
        class Roll(ttc.Transform):
            def __init__(self, shifts=(0, 2)):
                super().__init__(shifts)
            def augment(self, x, param):
                return x.roll(param, dims=-1)
            def deaugment(self, y, param, size):
                return y.roll(-param, dims=-1)

    Raises:
        ValueError: if ``params`` is empty.
    """

    spatial: ClassVar[bool] = True
    #: The name views are labelled with (see :meth:`describe`): a built-in's registered name, set on a subclass by
    #: :func:`~ttc_lightning.register_transform`; ``None`` labels views with the class name.
    label: ClassVar[str | None] = None

    def __init__(self, params: Sequence[Any]) -> None:
        self.params: tuple[Any, ...] = tuple(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__} needs at least one parameter; got an empty sequence.")

    def augment(self, x: Tensor, param: Any) -> Tensor:
        """Apply the transform with ``param`` to an image batch ``(B, ..., H, W)``."""
        raise NotImplementedError

    def deaugment(self, y: Tensor, param: Any, size: Size | None) -> Tensor:
        """Map a dense output ``(B, ..., h, w)`` of an augmented input back; ``size`` is the target ``(H, W)``,
        or ``None`` when the output is not at the input's resolution."""
        raise NotImplementedError

    def deaugment_points(self, points: Tensor, param: Any, size: Size) -> Tensor:
        """Map ``(x, y)`` points predicted on the augmented image back to the image of ``size`` it came from."""
        raise NotImplementedError

    def output_size(self, size: Size, param: Any) -> Size:
        """Spatial size of the augmented image for an input of ``size``."""
        return size

    def check(self, size: Size, param: Any) -> None:
        """Raise ``ValueError`` if the transform cannot apply to an image of ``size``."""

    def reflects(self, param: Any) -> bool:
        """Whether the transform mirrors the image (left and right labels swap)."""
        return False

    def invertible(self, points: bool) -> bool:
        """Whether the outputs of a dense (``points=False``) or coordinate task can be mapped back."""
        if not self.spatial:
            return True
        method = "deaugment_points" if points else "deaugment"
        return getattr(type(self), method) is not getattr(Transform, method)

    def describe(self, param: Any) -> str:
        """A short label for one view, e.g. ``rot90(1)``."""
        return f"{type(self).__dict__.get('label') or type(self).__name__}({param})"

    @override
    def __repr__(self) -> str:
        return f"{type(self).__name__}(params={self.params!r})"


class _ValueTransform(Transform):
    """A transform of pixel values only: outputs need no inverse for any task."""

    spatial = False

    @override
    def deaugment(self, y: Tensor, param: Any, size: Size | None) -> Tensor:
        return y

    @override
    def deaugment_points(self, points: Tensor, param: Any, size: Size) -> Tensor:
        return points


class Identity(Transform):
    """The unchanged image: one view."""

    label = "identity"

    def __init__(self) -> None:
        super().__init__((None,))

    @override
    def augment(self, x: Tensor, param: Any) -> Tensor:
        return x

    @override
    def deaugment(self, y: Tensor, param: Any, size: Size | None) -> Tensor:
        return y

    @override
    def deaugment_points(self, points: Tensor, param: Any, size: Size) -> Tensor:
        return points


class _Mirror(Transform):
    """A self-inverse reflection with parameters ``(False, True)``."""

    def __init__(self) -> None:
        super().__init__((False, True))

    @override
    def reflects(self, param: bool) -> bool:
        return bool(param)

    @override
    def deaugment(self, y: Tensor, param: bool, size: Size | None) -> Tensor:
        return self.augment(y, param)


class HFlip(_Mirror):
    """Horizontal flip (left-right): views ``(False, True)``."""

    label = "hflip"

    @override
    def augment(self, x: Tensor, param: bool) -> Tensor:
        return F.hflip(x) if param else x

    @override
    def deaugment_points(self, points: Tensor, param: bool, size: Size) -> Tensor:
        return F.points_hflip(points, size) if param else points


class VFlip(_Mirror):
    """Vertical flip (top-bottom): views ``(False, True)``."""

    label = "vflip"

    @override
    def augment(self, x: Tensor, param: bool) -> Tensor:
        return F.vflip(x) if param else x

    @override
    def deaugment_points(self, points: Tensor, param: bool, size: Size) -> Tensor:
        return F.points_vflip(points, size) if param else points


class Transpose(_Mirror):
    """Swap of the spatial axes: views ``(False, True)``; on non-square images ``H`` and ``W`` swap."""

    label = "transpose"

    @override
    def augment(self, x: Tensor, param: bool) -> Tensor:
        return F.transpose(x) if param else x

    @override
    def output_size(self, size: Size, param: bool) -> Size:
        return (size[1], size[0]) if param else size

    @override
    def deaugment_points(self, points: Tensor, param: bool, size: Size) -> Tensor:
        return F.points_transpose(points) if param else points


class Rotate90(Transform):
    """Rotations by ``k`` quarter turns counter-clockwise (``torch.rot90`` with dims ``(-2, -1)``).

    Args:
        ks: the turns, identity ``0`` prepended when missing. Default ``(0, 1, 2, 3)``.

    Raises:
        ValueError: if a turn is not an integer in ``0..3``.
    """

    label = "rot90"

    def __init__(self, ks: Sequence[int] = (0, 1, 2, 3)) -> None:
        bad = [k for k in sequence("ks", ks) if isinstance(k, bool) or not isinstance(k, int) or k not in range(4)]
        if bad:
            raise ValueError(f"`ks`={tuple(ks)!r} must hold integers in 0..3 (quarter turns); got {bad!r}.")
        super().__init__(with_identity(0, ks))

    @override
    def augment(self, x: Tensor, param: int) -> Tensor:
        return F.rot90(x, param) if param else x

    @override
    def deaugment(self, y: Tensor, param: int, size: Size | None) -> Tensor:
        return F.rot90(y, -param) if param else y

    @override
    def deaugment_points(self, points: Tensor, param: int, size: Size) -> Tensor:
        return F.points_rot90(points, -param, self.output_size(size, param)) if param else points

    @override
    def output_size(self, size: Size, param: int) -> Size:
        return (size[1], size[0]) if param % 2 else size


class _Resampling(Transform):
    """Shared inverse of the transforms that resample the image to another size."""

    def __init__(self, params: Sequence[Any], interpolation: str, what: str) -> None:
        super().__init__(params)
        self.interpolation = check_interpolation(interpolation)
        if len(self.params) == 1:
            why = f"{what} leave only the identity view, which is never resampled"
            check_unused("interpolation", interpolation, "bilinear", why, "Add a view that resamples or drop it")

    @override
    def augment(self, x: Tensor, param: Any) -> Tensor:
        return F.resize(x, self.output_size(tuple(x.shape[-2:]), param), self.interpolation)

    @override
    def deaugment(self, y: Tensor, param: Any, size: Size | None) -> Tensor:
        if size is None:
            raise ValueError(
                f"{self.describe(param)} needs the model's dense output at the input's resolution to restore the "
                f"original size; got an output of spatial size {tuple(y.shape[-2:])}."
            )
        return F.resize(y, size, self.interpolation)

    @override
    def deaugment_points(self, points: Tensor, param: Any, size: Size) -> Tensor:
        return F.points_resize(points, self.output_size(size, param), size)


class Scale(_Resampling):
    """Rescaling by factors; the inverse restores the exact original size.

    Args:
        scales: factors, identity ``1.0`` prepended when missing. Default ``(1.0, 0.875, 1.125)``. The scaled size
            is ``floor(side * scale)`` (at least 1), as ``interpolate(scale_factor=...)`` and ttach compute it.
        interpolation: ``torch.nn.functional.interpolate`` mode, one of ``nearest``, ``bilinear``, ``bicubic``,
            ``area``; refused when every scale is 1 (nothing is resampled). Default ``bilinear`` (ttach: ``nearest``).

    Raises:
        ValueError: if a scale is not a positive number, or for an unknown or unused ``interpolation``.
    """

    label = "scale"

    def __init__(self, scales: Sequence[float] = (1.0, 0.875, 1.125), interpolation: str = "bilinear") -> None:
        bad = [s for s in sequence("scales", scales) if not isinstance(s, int | float) or isinstance(s, bool) or s <= 0]
        if bad:
            raise ValueError(f"`scales`={tuple(scales)!r} must be positive numbers; got {bad!r}.")
        super().__init__(with_identity(1.0, [float(s) for s in scales]), interpolation, f"scales={tuple(scales)!r}")

    @override
    def output_size(self, size: Size, param: float) -> Size:
        return (max(1, math.floor(size[0] * param)), max(1, math.floor(size[1] * param)))


class Resize(_Resampling):
    """Resizing to fixed sizes; the inverse restores the exact original size.

    Args:
        sizes: ``(H, W)`` pairs (or ints for square sizes); the original size (parameter ``None``) comes first.
        interpolation: as for :class:`Scale` (refused without ``sizes``). Default ``bilinear``.
    """

    label = "resize"

    def __init__(self, sizes: Sequence[int | Sequence[int]], interpolation: str = "bilinear") -> None:
        pairs = [size_pair("sizes", s) for s in sequence("sizes", sizes)]
        super().__init__((None, *pairs), interpolation, f"sizes={tuple(sizes)!r}")

    @override
    def output_size(self, size: Size, param: Size | None) -> Size:
        return size if param is None else param


class Add(_ValueTransform):
    """Adds a constant to every pixel (no spatial change).

    Args:
        values: offsets, identity ``0.0`` prepended when missing. Default ``(0.0, -0.1, 0.1)``.
    """

    label = "add"

    def __init__(self, values: Sequence[float] = (0.0, -0.1, 0.1)) -> None:
        super().__init__(with_identity(0.0, numbers("values", values)))

    @override
    def augment(self, x: Tensor, param: float) -> Tensor:
        return x + param if param else x


class Multiply(_ValueTransform):
    """Multiplies every pixel by a factor (no spatial change).

    Args:
        factors: factors, identity ``1.0`` prepended when missing. Default ``(1.0, 0.9, 1.1)``.
    """

    label = "multiply"

    def __init__(self, factors: Sequence[float] = (1.0, 0.9, 1.1)) -> None:
        super().__init__(with_identity(1.0, numbers("factors", factors)))

    @override
    def augment(self, x: Tensor, param: float) -> Tensor:
        return x * param if param != 1.0 else x


CROP_POSITIONS = ("center", "top_left", "top_right", "bottom_left", "bottom_right")


class FiveCrop(Transform):
    """The center crop and the four corner crops (in that order); no inverse, so classification only.

    The crops are ttach's (center at ``H // 2 - h // 2``); ttach lists the center crop last.

    Args:
        size: crop size as ``(H, W)`` or an int in pixels, or a float in ``(0, 1]`` as a fraction of each image side
            (floored, at least 1). Default ``0.875`` (the 224/256 ratio of ImageNet evaluation). The model must accept
            the smaller input (global pooling).

    Raises:
        ValueError: if ``size`` is a fraction outside ``(0, 1]`` or not a positive size.
    """

    label = "five_crop"

    def __init__(self, size: float | int | Sequence[int] = 0.875) -> None:
        if isinstance(size, float):
            if not 0 < size <= 1:
                raise ValueError(f"`size`={size!r} as a fraction must lie in (0, 1].")
            self.size: float | Size = size
        else:
            self.size = size_pair("size", size)
        super().__init__(CROP_POSITIONS)

    def _crop_size(self, size: Size) -> Size:
        if isinstance(self.size, float):
            return (max(1, math.floor(size[0] * self.size)), max(1, math.floor(size[1] * self.size)))
        return self.size

    @override
    def check(self, size: Size, param: str) -> None:
        crop = self._crop_size(size)
        if crop[0] > size[0] or crop[1] > size[1]:
            raise ValueError(f"`size`={self.size!r}: the crop {crop} is larger than the image {tuple(size)}.")

    @override
    def output_size(self, size: Size, param: str) -> Size:
        return self._crop_size(size)

    @override
    def augment(self, x: Tensor, param: str) -> Tensor:
        height, width = x.shape[-2:]
        h, w = self._crop_size((height, width))
        top = {"center": height // 2 - h // 2, "top_left": 0, "top_right": 0}.get(param, height - h)
        left = {"center": width // 2 - w // 2, "top_left": 0, "bottom_left": 0}.get(param, width - w)
        return F.crop(x, top, left, h, w)


#: What ``transforms=`` accepts: an alias or registered name, a :class:`Transform`, or a list of these (their product).
TransformSpec = str | Transform | Sequence[str | Transform]
