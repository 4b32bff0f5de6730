"""Transform names and aliases: :func:`register_transform`, :data:`ALIASES` and :func:`resolve_transforms`."""

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ttc_lightning.tta.transforms import (
    Add,
    FiveCrop,
    HFlip,
    Identity,
    Multiply,
    Rotate90,
    Scale,
    Transform,
    TransformSpec,
    Transpose,
    VFlip,
)

TransformT = TypeVar("TransformT", bound=type[Transform])
#: Registered names and their classes, instantiated with their default arguments when named.
_REGISTRY: dict[str, type[Transform]] = {
    cls.label: cls  # type: ignore[misc]
    for cls in (Identity, HFlip, VFlip, Rotate90, Transpose, Scale, Add, Multiply, FiveCrop)
}

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


def register_transform(name: str) -> Callable[[TransformT], TransformT]:
    """Class decorator registering a :class:`Transform` subclass under ``name``.

    A registered name is accepted wherever transform names are (``transforms=["hflip", name]``); the class is
    instantiated with its default arguments, and its views are labelled with ``name``.

    Raises:
        ValueError: if ``name`` is empty or already taken by a transform or an alias.
        TypeError: if the decorated object is not a :class:`Transform` subclass.
    """

    if not isinstance(name, str) or not name:
        raise ValueError(f"register_transform: the name {name!r} must be a non-empty string.")

    def decorator(cls: TransformT) -> TransformT:
        if not (isinstance(cls, type) and issubclass(cls, Transform)):
            raise TypeError(f"register_transform({name!r}) decorates Transform subclasses; got {cls!r}.")
        if name in _REGISTRY or name in ALIASES:
            raise ValueError(f"register_transform: the name {name!r} is already taken by {_REGISTRY.get(name)}.")
        _REGISTRY[name] = cls
        cls.label = name
        return cls

    return decorator


def resolve_transforms(spec: TransformSpec) -> list[Transform]:
    """Turn an alias, a registered name, a :class:`Transform` or a list of these into a list of transforms.

    Raises:
        ValueError: for an unknown name.
        TypeError: for anything else than a name, a transform or a non-empty list of those.
    """
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
    """``item`` after checking it is a name or a :class:`Transform` (a list entry of ``transforms``)."""
    if not isinstance(item, str | Transform):
        raise TypeError(f"`transforms` entries must be names or Transform objects; got {type(item).__name__}.")
    return item
