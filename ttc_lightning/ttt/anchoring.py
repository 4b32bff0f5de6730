"""Model anchoring: parts that hold the adapted parameters near a reference after every update.

* :class:`EMATeacher`: a teacher whose parameters follow the student's as an exponential moving average (CoTTA).
* :class:`WeightEnsemble`: the adapted parameters pulled toward the source ones, ``alpha * theta + (1 - alpha) *
  theta_0`` (ROID's weight ensembling).
* :class:`StochasticRestore`: each adapted element returns to its source value with a probability (CoTTA).

An anchor copies the adapted parameters at the start of a stage (:meth:`Anchor.start`) and again on every reset
(:meth:`Anchor.reset`, the parameters then hold the source values), and acts after every update
(:meth:`Anchor.after_update`). Its copy (and generator) is saved with the adaptation state.
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


class Anchor:
    """A part that keeps a copy of the adapted parameters (:attr:`values`: a teacher, the source), taken at the start
    of a stage and again on every reset, and acts after every update (:meth:`after_update`)."""

    def __init__(self) -> None:
        self.values: list[Tensor] = []

    def start(self, params: Sequence[nn.Parameter]) -> None:
        """Begin a stage over ``params`` (their values are the source's)."""
        self.reset(params)

    def reset(self, params: Sequence[nn.Parameter]) -> None:
        """Copy ``params`` again after a reset (their values are the source's)."""
        self.values = [p.detach().clone() for p in params]

    def after_update(self, params: Sequence[nn.Parameter]) -> None:
        """Act on ``params`` (or the copy) after an optimizer step."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """What to save with the adaptation state."""
        return {"values": self.values}

    def load_state(self, state: dict[str, Any], params: Sequence[nn.Parameter]) -> None:
        """Continue from a :meth:`state` (tensors go to the device of ``params``)."""
        self.values = [v.to(p.device) for v, p in zip(state["values"], params, strict=True)]


class EMATeacher(Anchor):
    """A teacher copy of the adapted parameters (:attr:`values`), moved after every update as ``momentum * teacher +
    (1 - momentum) * student``; :func:`swapped` runs the model with it.

    Args:
        momentum: the teacher's momentum, in ``[0, 1]`` (``1``: a frozen teacher).
        name: the argument name errors give. Default ``"ema"``.

    Raises:
        ValueError: for a momentum outside ``[0, 1]``.
    """

    def __init__(self, momentum: float, name: str = "ema") -> None:
        super().__init__()
        self.momentum = check_range(name, momentum, 0, 1)

    @override
    def after_update(self, params: Sequence[nn.Parameter]) -> None:
        with torch.no_grad():
            for p, teacher in zip(params, self.values, strict=True):
                teacher.mul_(self.momentum).add_(p.detach(), alpha=1 - self.momentum)


class WeightEnsemble(Anchor):
    """The adapted parameters pulled toward the source (:attr:`values`) after every update: ``theta <- alpha * theta +
    (1 - alpha) * theta_0`` (ROID's weight ensembling).

    Args:
        alpha: the weight of the adapted parameters, in ``[0, 1)`` (``1`` would leave them alone: refused).
        name: the argument name errors give. Default ``"alpha"``.

    Raises:
        ValueError: for an ``alpha`` outside ``[0, 1)``.
    """

    def __init__(self, alpha: float, name: str = "alpha") -> None:
        super().__init__()
        self.alpha = check_range(name, alpha, 0, 1)
        if self.alpha == 1:
            raise ValueError(
                f"`{name}`=1 has no effect: the adapted parameters keep their whole weight, so the ensemble never "
                "pulls them toward the source. Use an alpha below 1 (ROID: 0.99) or drop the WeightEnsemble."
            )

    @override
    def after_update(self, params: Sequence[nn.Parameter]) -> None:
        with torch.no_grad():
            for p, source in zip(params, self.values, strict=True):
                p.mul_(self.alpha).add_(source, alpha=1 - self.alpha)


class StochasticRestore(Anchor):
    """After every update each adapted element returns to its source value (:attr:`values`) with probability
    ``prob``; the masks come from a private generator seeded with ``seed`` at the start of every stage (the same
    stream on every rank, so that synchronized ranks stay identical), not reseeded on resets.

    Args:
        prob: the restore probability, in ``[0, 1]``.
        seed: the masks' seed. Default ``0``.
        name: the argument name errors give. Default ``"restore_prob"``.

    Raises:
        ValueError: for a probability outside ``[0, 1]`` or a negative seed.
    """

    def __init__(self, prob: float, seed: int = 0, name: str = "restore_prob") -> None:
        super().__init__()
        self.prob = check_range(name, prob, 0, 1)
        self.seed = check_int("seed", seed, 0)
        self.generator = seeded_generator(self.seed)

    @override
    def start(self, params: Sequence[nn.Parameter]) -> None:
        self.generator = seeded_generator(self.seed)  # not per rank: the same masks on every rank
        self.reset(params)

    @override
    def after_update(self, params: Sequence[nn.Parameter]) -> None:
        with torch.no_grad():
            for p, source in zip(params, self.values, strict=True):
                mask = (torch.rand(p.shape, generator=self.generator) < self.prob).to(p.device)
                p.copy_(torch.where(mask, source, p))

    @override
    def state(self) -> dict[str, Any]:
        return {**super().state(), "masks": self.generator.get_state()}

    @override
    def load_state(self, state: dict[str, Any], params: Sequence[nn.Parameter]) -> None:
        super().load_state(state, params)
        self.generator.set_state(state["masks"])
