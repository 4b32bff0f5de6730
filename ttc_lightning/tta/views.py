"""Views: the augmented variants a transform spec expands into, in ttach's product order.

A list of transforms expands into the product of their parameters, the last transform varying fastest and the
identity view first (every transform lists its identity parameter first), one :class:`View` per combination.
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from typing_extensions import override

from ttc_lightning.tta.functional import Size
from ttc_lightning.tta.registry import resolve_transforms
from ttc_lightning.tta.transforms import Transform, TransformSpec


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
        """Apply the steps in order to an image batch."""
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
        """Map ``(x, y)`` points predicted on the augmented image back to the image of ``size``."""
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
        """Whether a step moves pixels."""
        return any(transform.spatial for transform, _ in self.steps)

    @override
    def __str__(self) -> str:
        return "*".join(transform.describe(param) for transform, param in self.steps)


def expand(transforms: Sequence[Transform]) -> list[View]:
    """All views of a composition: the product of the parameters, last transform fastest."""
    return [
        View(tuple(zip(transforms, params, strict=True)))
        for params in itertools.product(*(t.params for t in transforms))
    ]


def expand_views(spec: TransformSpec) -> list[View]:
    """The views of a transform spec, in the order test-time augmentation runs them.

    Args:
        spec: what ``transforms=`` accepts: an alias (``hflip``, ``flip``, ``d4``, ``multiscale``, ``five_crop``,
            ``ten_crop``, ...), a registered name, a :class:`~ttc_lightning.Transform`, or a list of these.

    Returns:
        One :class:`View` per combination of parameters, the last transform varying fastest, identity first.

    Raises:
        ValueError: for an unknown name.
        TypeError: for anything else than a name, a transform or a non-empty list of those.

    Example::

        views = ttc.expand_views("d4")
        [str(v) for v in views[:3]]  # ['hflip(False)*rot90(0)', 'hflip(False)*rot90(1)', 'hflip(False)*rot90(2)']
        augmented = views[1].augment(images)
    """
    return expand(resolve_transforms(spec))
