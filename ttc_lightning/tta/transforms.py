"""Invertible test-time transforms, their registry and aliases, and the views a composition expands into.

A :class:`Transform` has a finite tuple of parameters, identity first; a list of transforms expands into the
product of their parameters (the last transform varies fastest, as in ttach), one :class:`View` per combination.
"""

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from torch import Tensor

from ttc_lightning.checks import check_unused
from ttc_lightning.tta import functional as F
from ttc_lightning.tta.functional import Size

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")


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
    """

    spatial: ClassVar[bool] = True

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
        return f"{_NAMES.get(type(self), type(self).__name__)}({param})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(params={self.params!r})"


class _ValueTransform(Transform):
    """A transform of pixel values only: outputs need no inverse for any task."""

    spatial = False

    def deaugment(self, y: Tensor, param: Any, size: Size | None) -> Tensor:
        return y

    def deaugment_points(self, points: Tensor, param: Any, size: Size) -> Tensor:
        return points


def _sequence(name: str, values: Any) -> list[Any]:
    """``values`` as a list, after checking it is a list or tuple (not a single value or a string)."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(
            f"`{name}`={values!r} must be a list or tuple of values, not a single {type(values).__name__}."
        )
    return list(values)


def _numbers(name: str, values: Any) -> list[float]:
    """``values`` as floats, after checking it is a list or tuple of numbers (not bools)."""
    bad = [v for v in _sequence(name, values) if isinstance(v, bool) or not isinstance(v, int | float)]
    if bad:
        raise ValueError(f"`{name}`={tuple(values)!r} must hold numbers; got {bad!r}.")
    return [float(v) for v in values]


def _with_identity(identity: Any, values: Sequence[Any]) -> tuple[Any, ...]:
    """``values`` without repeats, identity first."""
    return tuple(dict.fromkeys((identity, *values)))


class Identity(Transform):
    """The unchanged image: one view."""

    def __init__(self) -> None:
        super().__init__((None,))

    def augment(self, x: Tensor, param: Any) -> Tensor:
        return x

    def deaugment(self, y: Tensor, param: Any, size: Size | None) -> Tensor:
        return y

    def deaugment_points(self, points: Tensor, param: Any, size: Size) -> Tensor:
        return points


class _Mirror(Transform):
    """A self-inverse reflection with parameters ``(False, True)``."""

    def __init__(self) -> None:
        super().__init__((False, True))

    def reflects(self, param: bool) -> bool:
        return bool(param)

    def deaugment(self, y: Tensor, param: bool, size: Size | None) -> Tensor:
        return self.augment(y, param)


class HFlip(_Mirror):
    """Horizontal flip (left-right): views ``(False, True)``."""

    def augment(self, x: Tensor, param: bool) -> Tensor:
        return F.hflip(x) if param else x

    def deaugment_points(self, points: Tensor, param: bool, size: Size) -> Tensor:
        return F.points_hflip(points, size) if param else points


class VFlip(_Mirror):
    """Vertical flip (top-bottom): views ``(False, True)``."""

    def augment(self, x: Tensor, param: bool) -> Tensor:
        return F.vflip(x) if param else x

    def deaugment_points(self, points: Tensor, param: bool, size: Size) -> Tensor:
        return F.points_vflip(points, size) if param else points


class Transpose(_Mirror):
    """Swap of the spatial axes: views ``(False, True)``; on non-square images ``H`` and ``W`` swap."""

    def augment(self, x: Tensor, param: bool) -> Tensor:
        return F.transpose(x) if param else x

    def output_size(self, size: Size, param: bool) -> Size:
        return (size[1], size[0]) if param else size

    def deaugment_points(self, points: Tensor, param: bool, size: Size) -> Tensor:
        return F.points_transpose(points) if param else points


class Rotate90(Transform):
    """Rotations by ``k`` quarter turns counter-clockwise (``torch.rot90`` with dims ``(-2, -1)``).

    Args:
        ks: the turns, identity ``0`` prepended when missing. Default ``(0, 1, 2, 3)``.
    """

    def __init__(self, ks: Sequence[int] = (0, 1, 2, 3)) -> None:
        bad = [k for k in _sequence("ks", ks) if isinstance(k, bool) or not isinstance(k, int) or k not in range(4)]
        if bad:
            raise ValueError(f"`ks`={tuple(ks)!r} must hold integers in 0..3 (quarter turns); got {bad!r}.")
        super().__init__(_with_identity(0, ks))

    def augment(self, x: Tensor, param: int) -> Tensor:
        return F.rot90(x, param) if param else x

    def deaugment(self, y: Tensor, param: int, size: Size | None) -> Tensor:
        return F.rot90(y, -param) if param else y

    def deaugment_points(self, points: Tensor, param: int, size: Size) -> Tensor:
        return F.points_rot90(points, -param, self.output_size(size, param)) if param else points

    def output_size(self, size: Size, param: int) -> Size:
        return (size[1], size[0]) if param % 2 else size


def _check_interpolation(mode: str) -> str:
    if mode not in INTERPOLATIONS:
        raise ValueError(f"`interpolation`={mode!r} is not supported; allowed: {', '.join(INTERPOLATIONS)}.")
    return mode


class _Resampling(Transform):
    """Shared inverse of the transforms that resample the image to another size."""

    def __init__(self, params: Sequence[Any], interpolation: str, what: str) -> None:
        super().__init__(params)
        self.interpolation = _check_interpolation(interpolation)
        if len(self.params) == 1:
            why = f"{what} leave only the identity view, which is never resampled"
            check_unused("interpolation", interpolation, "bilinear", why, "Add a view that resamples or drop it")

    def augment(self, x: Tensor, param: Any) -> Tensor:
        return F.resize(x, self.output_size(tuple(x.shape[-2:]), param), self.interpolation)

    def deaugment(self, y: Tensor, param: Any, size: Size | None) -> Tensor:
        if size is None:
            raise ValueError(
                f"{self.describe(param)} needs the model's dense output at the input's resolution to restore the "
                f"original size; got an output of spatial size {tuple(y.shape[-2:])}."
            )
        return F.resize(y, size, self.interpolation)

    def deaugment_points(self, points: Tensor, param: Any, size: Size) -> Tensor:
        return F.points_resize(points, self.output_size(size, param), size)


class Scale(_Resampling):
    """Rescaling by factors; the inverse restores the exact original size.

    Args:
        scales: factors, identity ``1.0`` prepended when missing. Default ``(1.0, 0.875, 1.125)``. The scaled size
            is ``floor(side * scale)`` (at least 1), as ``interpolate(scale_factor=...)`` and ttach compute it.
        interpolation: ``torch.nn.functional.interpolate`` mode, one of ``nearest``, ``bilinear``, ``bicubic``,
            ``area``; refused when every scale is 1 (nothing is resampled). Default ``bilinear`` (ttach: ``nearest``).
    """

    def __init__(self, scales: Sequence[float] = (1.0, 0.875, 1.125), interpolation: str = "bilinear") -> None:
        bad = [
            s for s in _sequence("scales", scales) if not isinstance(s, int | float) or isinstance(s, bool) or s <= 0
        ]
        if bad:
            raise ValueError(f"`scales`={tuple(scales)!r} must be positive numbers; got {bad!r}.")
        super().__init__(_with_identity(1.0, [float(s) for s in scales]), interpolation, f"scales={tuple(scales)!r}")

    def output_size(self, size: Size, param: float) -> Size:
        return (max(1, math.floor(size[0] * param)), max(1, math.floor(size[1] * param)))


class Resize(_Resampling):
    """Resizing to fixed sizes; the inverse restores the exact original size.

    Args:
        sizes: ``(H, W)`` pairs (or ints for square sizes); the original size (parameter ``None``) comes first.
        interpolation: as for :class:`Scale` (refused without ``sizes``). Default ``bilinear``.
    """

    def __init__(self, sizes: Sequence[int | Sequence[int]], interpolation: str = "bilinear") -> None:
        pairs = [_as_pair("sizes", s) for s in _sequence("sizes", sizes)]
        super().__init__((None, *pairs), interpolation, f"sizes={tuple(sizes)!r}")

    def output_size(self, size: Size, param: Size | None) -> Size:
        return size if param is None else param


def _as_pair(name: str, value: int | Sequence[int]) -> Size:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, Sequence) else ()
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"`{name}` entry {value!r} must be a positive int or a pair (H, W) of positive ints.")
    return pair  # type: ignore[return-value]


class Add(_ValueTransform):
    """Adds a constant to every pixel (no spatial change).

    Args:
        values: offsets, identity ``0.0`` prepended when missing. Default ``(0.0, -0.1, 0.1)``.
    """

    def __init__(self, values: Sequence[float] = (0.0, -0.1, 0.1)) -> None:
        super().__init__(_with_identity(0.0, _numbers("values", values)))

    def augment(self, x: Tensor, param: float) -> Tensor:
        return x + param if param else x


class Multiply(_ValueTransform):
    """Multiplies every pixel by a factor (no spatial change).

    Args:
        factors: factors, identity ``1.0`` prepended when missing. Default ``(1.0, 0.9, 1.1)``.
    """

    def __init__(self, factors: Sequence[float] = (1.0, 0.9, 1.1)) -> None:
        super().__init__(_with_identity(1.0, _numbers("factors", factors)))

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
    """

    def __init__(self, size: float | int | Sequence[int] = 0.875) -> None:
        if isinstance(size, float):
            if not 0 < size <= 1:
                raise ValueError(f"`size`={size!r} as a fraction must lie in (0, 1].")
            self.size: float | Size = size
        else:
            self.size = _as_pair("size", size)
        super().__init__(CROP_POSITIONS)

    def _crop_size(self, size: Size) -> Size:
        if isinstance(self.size, float):
            return (max(1, math.floor(size[0] * self.size)), max(1, math.floor(size[1] * self.size)))
        return self.size

    def check(self, size: Size, param: str) -> None:
        crop = self._crop_size(size)
        if crop[0] > size[0] or crop[1] > size[1]:
            raise ValueError(f"`size`={self.size!r}: the crop {crop} is larger than the image {tuple(size)}.")

    def output_size(self, size: Size, param: str) -> Size:
        return self._crop_size(size)

    def augment(self, x: Tensor, param: str) -> Tensor:
        height, width = x.shape[-2:]
        h, w = self._crop_size((height, width))
        top = {"center": height // 2 - h // 2, "top_left": 0, "top_right": 0}.get(param, height - h)
        left = {"center": width // 2 - w // 2, "top_left": 0, "bottom_left": 0}.get(param, width - w)
        return F.crop(x, top, left, h, w)


TransformT = TypeVar("TransformT", bound=type[Transform])
_REGISTRY: dict[str, type[Transform]] = {}
_NAMES: dict[type[Transform], str] = {}


def register_transform(name: str) -> Callable[[TransformT], TransformT]:
    """Class decorator registering a :class:`Transform` subclass under ``name``.

    A registered name is accepted wherever transform names are (``transforms=["hflip", name]``); the class is
    instantiated with its default arguments.
    """

    if not isinstance(name, str) or not name:
        raise ValueError(f"register_transform: the name {name!r} must be a non-empty string.")

    def decorator(cls: TransformT) -> TransformT:
        if not (isinstance(cls, type) and issubclass(cls, Transform)):
            raise TypeError(f"register_transform({name!r}) decorates Transform subclasses; got {cls!r}.")
        if name in _REGISTRY or name in ALIASES:
            raise ValueError(f"register_transform: the name {name!r} is already taken by {_REGISTRY.get(name)}.")
        _REGISTRY[name] = cls
        _NAMES[cls] = name
        return cls

    return decorator


for _name, _cls in [
    ("identity", Identity),
    ("hflip", HFlip),
    ("vflip", VFlip),
    ("rot90", Rotate90),
    ("transpose", Transpose),
    ("scale", Scale),
    ("add", Add),
    ("multiply", Multiply),
    ("five_crop", FiveCrop),
]:
    _REGISTRY[_name] = _cls
    _NAMES[_cls] = _name
_NAMES[Resize] = "resize"

#: Named compositions (``flip``: h-flip x v-flip; ``d4``: h-flip x rot90 0/90/180/270, identity first;
#: ``multiscale``: scales 1, 0.875, 1.125; ``five_crop``: 0.875 crops; ``ten_crop``: h-flip x five_crop).
ALIASES: dict[str, Callable[[], list[Transform]]] = {
    "identity": lambda: [Identity()],
    "hflip": lambda: [HFlip()],
    "vflip": lambda: [VFlip()],
    "flip": lambda: [HFlip(), VFlip()],
    "d4": lambda: [HFlip(), Rotate90()],
    "multiscale": lambda: [Scale()],
    "five_crop": lambda: [FiveCrop()],
    "ten_crop": lambda: [HFlip(), FiveCrop()],
}

TransformSpec = str | Transform | Sequence[str | Transform]


def resolve_transforms(spec: TransformSpec) -> list[Transform]:
    """Turn an alias, a registered name, a :class:`Transform` or a list of these into a list of transforms."""
    if isinstance(spec, Transform):
        return [spec]
    if isinstance(spec, str):
        if spec in ALIASES:
            return ALIASES[spec]()
        if spec in _REGISTRY:
            return [_REGISTRY[spec]()]
        known = sorted(set(ALIASES) | set(_REGISTRY))
        raise ValueError(f"`transforms`={spec!r} is not a known alias or transform; allowed: {', '.join(known)}.")
    if isinstance(spec, Sequence) and spec:
        return [t for item in spec for t in resolve_transforms(_single(item))]
    raise TypeError(
        f"`transforms` must be a name, a Transform or a non-empty list of those; got {type(spec).__name__} {spec!r}."
    )


def _single(item: Any) -> str | Transform:
    if not isinstance(item, str | Transform):
        raise TypeError(f"`transforms` entries must be names or Transform objects; got {type(item).__name__}.")
    return item


@dataclass(frozen=True)
class View:
    """One augmented view: a chain of ``(transform, parameter)`` steps applied in order."""

    steps: tuple[tuple[Transform, Any], ...]

    def sizes(self, size: Size) -> list[Size]:
        """Spatial sizes before each step, followed by the final size."""
        sizes = [tuple(size)]
        for transform, param in self.steps:
            sizes.append(tuple(transform.output_size(sizes[-1], param)))
        return sizes  # type: ignore[return-value]

    def check(self, size: Size) -> None:
        """Raise ``ValueError`` if a step cannot apply to an image of ``size``."""
        for (transform, param), step_size in zip(self.steps, self.sizes(size), strict=False):
            transform.check(step_size, param)

    def augment(self, x: Tensor) -> Tensor:
        for transform, param in self.steps:
            x = transform.augment(x, param)
        return x

    def deaugment(self, y: Tensor, size: Size) -> Tensor:
        """Map a dense output back; exact sizes are used only when ``y`` is at the augmented input's resolution."""
        sizes = self.sizes(size)
        exact = tuple(y.shape[-2:]) == sizes[-1]
        for (transform, param), step_size in zip(reversed(self.steps), reversed(sizes[:-1]), strict=True):
            y = transform.deaugment(y, param, step_size if exact else None)
        return y

    def deaugment_points(self, points: Tensor, size: Size) -> Tensor:
        sizes = self.sizes(size)
        for (transform, param), step_size in zip(reversed(self.steps), reversed(sizes[:-1]), strict=True):
            points = transform.deaugment_points(points, param, step_size)
        return points

    @property
    def reflects(self) -> bool:
        """Whether the view mirrors the image an odd number of times."""
        return sum(transform.reflects(param) for transform, param in self.steps) % 2 == 1

    @property
    def spatial(self) -> bool:
        return any(transform.spatial for transform, _ in self.steps)

    def __str__(self) -> str:
        return "*".join(transform.describe(param) for transform, param in self.steps)


def expand(transforms: Sequence[Transform]) -> list[View]:
    """All views of a composition: the product of the parameters, last transform fastest."""
    return [
        View(tuple(zip(transforms, params, strict=True)))
        for params in itertools.product(*(t.params for t in transforms))
    ]
