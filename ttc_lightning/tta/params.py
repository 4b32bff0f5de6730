"""Checks of transform parameters, with messages that name the argument and the bad entries."""

from collections.abc import Sequence
from typing import Any

from ttc_lightning.tta.functional import Size

#: ``torch.nn.functional.interpolate`` modes accepted by :class:`~ttc_lightning.Scale` and
#: :class:`~ttc_lightning.Resize`.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "area")


def sequence(name: str, values: Any) -> list[Any]:
    """``values`` as a list, after checking it is a list or tuple (not a single value or a string)."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(
            f"`{name}`={values!r} must be a list or tuple of values, not a single {type(values).__name__}."
        )
    return list(values)


def numbers(name: str, values: Any) -> list[float]:
    """``values`` as floats, after checking it is a list or tuple of numbers (not bools)."""
    bad = [v for v in sequence(name, values) if isinstance(v, bool) or not isinstance(v, int | float)]
    if bad:
        raise ValueError(f"`{name}`={tuple(values)!r} must hold numbers; got {bad!r}.")
    return [float(v) for v in values]


def with_identity(identity: Any, values: Sequence[Any]) -> tuple[Any, ...]:
    """``values`` without repeats, identity first."""
    return tuple(dict.fromkeys((identity, *values)))


def check_interpolation(mode: str) -> str:
    """``mode`` after checking it is one of :data:`INTERPOLATIONS`."""
    if mode not in INTERPOLATIONS:
        raise ValueError(f"`interpolation`={mode!r} is not supported; allowed: {', '.join(INTERPOLATIONS)}.")
    return mode


def size_pair(name: str, value: int | Sequence[int]) -> Size:
    """``value`` as an ``(H, W)`` pair of positive ints (an int for a square size)."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, Sequence) else ()
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair):
        raise ValueError(f"`{name}` entry {value!r} must be a positive int or a pair (H, W) of positive ints.")
    return pair  # type: ignore[return-value]
