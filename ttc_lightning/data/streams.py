"""Test streams of corrupted data: the shift settings that test-time adaptation benchmarks run."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ttc_lightning.checks import check_choice, check_int
from ttc_lightning.data.corruptions import (
    CORRUPTIONS,
    VALIDATION_CORRUPTIONS,
    check_images,
    check_severity,
    corrupt,
)

STREAM_MODES: tuple[str, ...] = ("reset", "continual", "gradual", "mixed")
GRADUAL_SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5, 4, 3, 2, 1)


@dataclass
class Shift:
    """One segment of a test stream.

    Attributes:
        name: the corruption, or ``"mixed"`` for a segment mixing several.
        severity: the severity, 1 to 5.
        images: the corrupted images ``(B, C, H, W)``.
        labels: their labels, in the same order.
        reset: whether an adaptation method should start again from the source model before this segment.
    """

    name: str
    severity: int
    images: Tensor
    labels: Tensor
    reset: bool


def stream(
    images: Tensor,
    labels: Tensor,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = (5,),
    mode: str = "reset",
    seed: int = 0,
) -> list[Shift]:
    """Corrupted copies of a test set, segment by segment, in one of the benchmark settings.

    * ``"reset"``: one segment per corruption and severity (corruptions in order, each one's severities in order),
      each with ``reset=True``: the CIFAR-10-C protocol, every shift adapted to from the source model.
    * ``"continual"``: the same segments, only the first with ``reset=True`` (CoTTA's continual protocol).
    * ``"gradual"``: per corruption, severities ramp 1, 2, 3, 4, 5, 4, 3, 2, 1 (:data:`GRADUAL_SEVERITIES`), one
      reset at the very start. ``severities`` is validated but does not change the ramp.
    * ``"mixed"``: one segment ``"mixed"`` holding the test set shuffled, each sample under a random corruption
      from ``corruptions`` (as equal shares as the set size allows) at the one severity ``severities`` must hold.

    Every segment holds the whole test set (``"mixed"``: shuffled, labels shuffled alike). The segment for a
    corruption and severity is ``corrupt(images, name, severity, seed)``, the same in every mode but ``"mixed"``.
    All segments are built at once: ``len(corruptions) * len(severities)`` copies of the test set in memory.

    Args:
        images: test images ``(N, C, H, W)`` in ``[0, 1]`` (see :func:`~ttc_lightning.data.corrupt`).
        labels: their labels, first dimension ``N``.
        corruptions: names from :data:`~ttc_lightning.data.CORRUPTIONS` or, to choose hyperparameters,
            :data:`~ttc_lightning.data.VALIDATION_CORRUPTIONS`. Default: the 15, in CIFAR-10-C's order.
        severities: integers from 1 to 5. Default ``(5,)``.
        mode: one of :data:`STREAM_MODES`. Default ``"reset"``.
        seed: seed of the corruptions and of the shuffling of ``"mixed"``. Default ``0``.

    Returns:
        The segments in stream order.

    Example::

        for shift in stream(x_test, y_test, mode="continual"):
            ...  # adapt on shift.images batch by batch, restarting from the source model where shift.reset
    """
    check_images(images)
    if not isinstance(labels, Tensor) or labels.ndim == 0 or len(labels) != len(images):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"`labels` must be a tensor with one entry per image ({len(images)}); got {shape}.")
    corruptions = _names(corruptions)
    severities = _severities(severities)
    check_choice("mode", mode, STREAM_MODES)
    check_int("seed", seed, 0)
    if mode == "mixed":
        if len(severities) != 1:
            raise ValueError(f"`severities`={severities!r} must hold exactly one severity for mode 'mixed'.")
        return [_mixed(images, labels, corruptions, severities[0], seed)]
    if mode == "gradual":
        severities = GRADUAL_SEVERITIES
    return [
        Shift(name, severity, corrupt(images, name, severity, seed), labels, reset=mode == "reset" or index == 0)
        for index, (name, severity) in enumerate((name, severity) for name in corruptions for severity in severities)
    ]


def _names(corruptions: Sequence[str]) -> tuple[str, ...]:
    if isinstance(corruptions, str) or not isinstance(corruptions, Sequence) or not corruptions:
        raise ValueError(
            f"`corruptions`={corruptions!r} must be a non-empty sequence of names from CORRUPTIONS or "
            "VALIDATION_CORRUPTIONS."
        )
    for name in corruptions:
        check_choice("corruptions", name, CORRUPTIONS + VALIDATION_CORRUPTIONS)
    return tuple(corruptions)


def _severities(severities: Sequence[int]) -> tuple[int, ...]:
    if not isinstance(severities, Sequence) or not severities:
        raise ValueError(f"`severities`={severities!r} must be a non-empty sequence of integers 1 to 5.")
    return tuple(check_severity("severities", severity) for severity in severities)


def _mixed(images: Tensor, labels: Tensor, corruptions: tuple[str, ...], severity: int, seed: int) -> Shift:
    rng = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=rng)
    kinds = torch.randperm(len(images), generator=rng) % len(corruptions)
    shuffled = images[order.to(images.device)]
    mixed = torch.empty_like(shuffled)
    for kind, name in enumerate(corruptions):
        chosen = (kinds == kind).nonzero().flatten().to(images.device)
        mixed[chosen] = corrupt(shuffled[chosen], name, severity, seed)
    return Shift("mixed", severity, mixed, labels[order.to(labels.device)], reset=True)
