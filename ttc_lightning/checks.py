"""Eager argument validation with messages that name the argument, the bad value and what is allowed."""

from collections.abc import Collection
from typing import Any


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
