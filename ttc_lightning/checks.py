"""Eager argument validation with messages that name the argument, the bad value and what is allowed."""

import functools
import inspect
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

import lightning.pytorch as pl

InitT = TypeVar("InitT", bound=Callable[..., None])


def check_choice(name: str, value: Any, allowed: Collection[Any]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"`{name}`={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}.")


def check_int(name: str, value: Any, minimum: int) -> int:
    """Return ``value`` if it is an ``int`` (not a bool) of at least ``minimum``; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}`={value!r} must be an integer >= {minimum}.")
    return value


def check_positive(name: str, value: Any, hint: str = "") -> float:
    """Return ``value`` if it is a positive number; raise ``ValueError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"`{name}`={value!r} must be a positive number{hint}.")
    return float(value)


def check_range(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    """Return ``value`` if it is a number (not a bool) in ``[low, high]`` (``(low, high]`` with ``low_open``, default
    ``False``); raise ``ValueError`` otherwise."""
    number = not isinstance(value, bool) and isinstance(value, int | float)
    if not number or not (low < value if low_open else low <= value) or not value <= high:
        raise ValueError(f"`{name}`={value!r} must be a number in {'(' if low_open else '['}{low}, {high}].")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a ``bool``; raise ``ValueError`` otherwise (a string such as ``"false"`` is truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}`={value!r} must be True or False.")
    return value


def check_trainer(trainer: Any, owner: str) -> None:
    """Raise ``TypeError`` unless ``trainer`` is a ``lightning.pytorch.Trainer`` (``owner`` names the callback).

    The standalone ``pytorch_lightning`` package is a separate copy of Lightning whose Trainer calls our hooks but
    does not recognise our base classes (prediction writers, progress bars), so results would be silently wrong.
    """
    if not isinstance(trainer, pl.Trainer):
        kind = f"{type(trainer).__module__.split('.')[0]}.{type(trainer).__name__}"
        raise TypeError(
            f"{owner} is a `lightning.pytorch` callback, but the Trainer is a {kind}. The `pytorch_lightning` package "
            "is a separate copy of Lightning whose classes do not mix with `lightning.pytorch`: use "
            "`import lightning.pytorch as pl` (or `import lightning as L`, the same API) for the Trainer and module."
        )


def is_default(value: Any, default: Any) -> bool:
    """Whether ``value`` is ``default`` (or equal to it: a value equal to the default is never refused)."""
    if value is default:
        return True
    try:
        return bool(value == default) and isinstance(value, bool) == isinstance(default, bool)
    except (RuntimeError, TypeError, ValueError):  # e.g. a tensor, whose == is element-wise
        return False


def check_unused(name: str, value: Any, default: Any, why: str, remedy: str) -> None:
    """Raise ``ValueError`` when ``value`` differs from ``default`` although it cannot act given the other arguments.

    The message names the argument and its value, says why it has no effect (``why``) and what would make it act
    (``remedy``).
    """
    if not is_default(value, default):
        raise ValueError(f"`{name}`={value!r} has no effect: {why}. {remedy}.")


def moved_keywords(moved: Mapping[str, str], place: str) -> Callable[[InitT], InitT]:
    """A decorator for ``__init__``: a keyword of ``moved`` (old name -> how to pass it now, ``"new=..."``) whose new
    argument the decorated ``__init__`` takes raises a ``TypeError`` saying that it moved to ``place`` and how to pass
    it, instead of Python's bare "unexpected keyword argument"."""

    def decorator(init: InitT) -> InitT:
        accepted = inspect.signature(init).parameters
        here = {name: where for name, where in moved.items() if where.split("=", 1)[0] in accepted}

        @functools.wraps(init)
        def checked(self: Any, *args: Any, **kwargs: Any) -> None:
            for name, where in here.items():
                if name in kwargs:
                    raise TypeError(f"{type(self).__name__}({name}=...) moved to {place}: pass {where}.")
            init(self, *args, **kwargs)

        return checked  # type: ignore[return-value]

    return decorator
