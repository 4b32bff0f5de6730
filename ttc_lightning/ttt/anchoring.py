"""Model anchoring: parts that hold the adapted parameters near a reference after every update.

* :class:`EMATeacher`: a teacher whose parameters follow the student's as an exponential moving average (CoTTA).
* :class:`WeightEnsemble`: the adapted parameters pulled toward the source ones, ``alpha * theta + (1 - alpha) *
  theta_0`` (ROID's weight ensembling).
* :class:`StochasticRestore`: each adapted element returns to its source value with a probability (CoTTA).

An anchor is started over the adapted parameters at the start of a stage (:meth:`Anchor.start`), started again on
every reset (:meth:`Anchor.reset`, the parameters then hold the source values) and acts after every update
(:meth:`Anchor.after_update`). Its state is saved with the adaptation state.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from ttc_lightning.checks import check_int, check_range
from ttc_lightning.ops.seeding import seeded_generator


@contextmanager
def swapped(params: Sequence[nn.Parameter], values: Sequence[Tensor]) -> Iterator[None]:
    """Run with ``params`` holding ``values`` (no copy: their storage is exchanged and put back)."""
    saved = [p.data for p in params]
    for p, value in zip(params, values, strict=True):
        p.data = value
    try:
        yield
    finally:
        for p, data in zip(params, saved, strict=True):
            p.data = data


def _clones(params: Sequence[nn.Parameter]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


def _on(values: list[Tensor], params: Sequence[nn.Parameter]) -> list[Tensor]:
    return [v.to(p.device) for v, p in zip(values, params, strict=True)]


class Anchor:
    """A part that acts on the adapted parameters after every update (the default does nothing)."""

    def start(self, params: Sequence[nn.Parameter]) -> None:
        """Begin a stage over ``params`` (their values are the source's)."""
        self.reset(params)

    def reset(self, params: Sequence[nn.Parameter]) -> None:
        """Start again from ``params`` after a reset (their values are the source's)."""

    def after_update(self, params: Sequence[nn.Parameter]) -> None:
        """Act on ``params`` after an optimizer step."""

    def state(self) -> dict[str, Any]:
        """What to save with the adaptation state."""
        return {}

    def load_state(self, state: dict[str, Any], params: Sequence[nn.Parameter]) -> None:
        """Continue from a :meth:`state` (tensors go to the device of ``params``)."""


class EMATeacher(Anchor):
    """A teacher copy of the adapted parameters, moved after every update as ``momentum * teacher + (1 - momentum) *
    student``; :func:`swapped` runs the model with it.

    Args:
        momentum: the teacher's momentum, in ``[0, 1]`` (``1``: a frozen teacher).

    Raises:
        ValueError: for a momentum outside ``[0, 1]``.
    """

    def __init__(self, momentum: float, name: str = "ema") -> None:
        self.momentum = check_range(name, momentum, 0, 1)
        self.values: list[Tensor] = []

    @override
    def reset(self, params: Sequence[nn.Parameter]) -> None:
        self.values = _clones(params)

    @override
    def after_update(self, params: Sequence[nn.Parameter]) -> None:
        with torch.no_grad():
            for p, teacher in zip(params, self.values, strict=True):
                teacher.mul_(self.momentum).add_(p.detach(), alpha=1 - self.momentum)

    @override
    def state(self) -> dict[str, Any]:
        return {"teacher": self.values}

    @override
    def load_state(self, state: dict[str, Any], params: Sequence[nn.Parameter]) -> None:
        self.values = _on(state["teacher"], params)


class WeightEnsemble(Anchor):
    """The adapted parameters pulled toward the source after every update: ``theta <- alpha * theta + (1 - alpha) *
    theta_0`` (ROID's weight ensembling; ``alpha=1`` leaves them alone).

    Args:
        alpha: the weight of the adapted parameters, in ``[0, 1]``.

    Raises:
        ValueError: for an ``alpha`` outside ``[0, 1]``.
    """

    def __init__(self, alpha: float, name: str = "alpha") -> None:
        self.alpha = check_range(name, alpha, 0, 1)
        self.source: list[Tensor] = []

    @override
    def reset(self, params: Sequence[nn.Parameter]) -> None:
        self.source = _clones(params)

    @override
    def after_update(self, params: Sequence[nn.Parameter]) -> None:
        with torch.no_grad():
            for p, source in zip(params, self.source, strict=True):
                p.mul_(self.alpha).add_(source, alpha=1 - self.alpha)

    @override
    def state(self) -> dict[str, Any]:
        return {"source": self.source}

    @override
    def load_state(self, state: dict[str, Any], params: Sequence[nn.Parameter]) -> None:
        self.source = _on(state["source"], params)


class StochasticRestore(Anchor):
    """After every update each adapted element returns to its source value with probability ``prob``; the masks come
    from a private generator seeded with ``seed`` at the start of every stage (the same stream on every rank, so that
    synchronized ranks stay identical), not reseeded on resets.

    Args:
        prob: the restore probability, in ``[0, 1]``.
        seed: the masks' seed.

    Raises:
        ValueError: for a probability outside ``[0, 1]`` or a negative seed.
    """

    def __init__(self, prob: float, seed: int = 0, name: str = "restore_prob") -> None:
        self.prob = check_range(name, prob, 0, 1)
        self.seed = check_int("seed", seed, 0)
        self.source: list[Tensor] = []
        self.generator = torch.Generator()

    @override
    def start(self, params: Sequence[nn.Parameter]) -> None:
        self.generator = seeded_generator(self.seed)  # not per rank: the same masks on every rank
        self.reset(params)

    @override
    def reset(self, params: Sequence[nn.Parameter]) -> None:
        self.source = _clones(params)

    @override
    def after_update(self, params: Sequence[nn.Parameter]) -> None:
        with torch.no_grad():
            for p, source in zip(params, self.source, strict=True):
                mask = (torch.rand(p.shape, generator=self.generator) < self.prob).to(p.device)
                p.copy_(torch.where(mask, source, p))

    @override
    def state(self) -> dict[str, Any]:
        return {"source": self.source, "masks": self.generator.get_state()}

    @override
    def load_state(self, state: dict[str, Any], params: Sequence[nn.Parameter]) -> None:
        self.source = _on(state["source"], params)
        self.generator.set_state(state["masks"])
