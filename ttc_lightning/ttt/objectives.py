"""Objectives of test-time training: what the adaptation step minimises.

An objective maps the model's output for a batch to a scalar loss, or to a :class:`Loss` that also says which
samples entered it (filters). A plain callable ``output -> scalar tensor`` works too.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ttc_lightning.ops import entropy as ops_entropy


def check_logits(output: Any, owner: str) -> Tensor:
    """Return ``output`` if it is a tensor of class logits ``(B, C, ...)`` with ``C >= 2`` classes on dim 1; raise
    ``ValueError`` naming ``owner`` otherwise."""
    if not isinstance(output, Tensor) or output.ndim < 2 or output.shape[1] < 2:
        got = f"shape {tuple(output.shape)}" if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(
            f"{owner} needs class logits (B, C) or (B, C, ...) with at least 2 classes on dim 1; the model returned "
            f"{got}. Make forward return the logits tensor (not a tuple, dict or one score per sample)."
        )
    return output


def entropy(logits: Tensor, dim: int = 1) -> Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` along ``dim``, per sample, of ``logits`` checked to be class
    logits (:func:`ttc_lightning.ops.entropy.entropy`)."""
    return ops_entropy.entropy(check_logits(logits, "The entropy objective"), dim)


@dataclass
class Loss:
    """A loss and, for filtering objectives, the samples (``(B,)`` bool) that entered it."""

    value: Tensor
    kept: Tensor | None = None


Objective = Callable[[Tensor], "Tensor | Loss"]


def mean_entropy(output: Tensor) -> Tensor:
    """TENT's objective: the batch mean of the per-sample prediction entropy."""
    return entropy(output).mean()


OBJECTIVES: dict[str, Objective] = {"entropy": mean_entropy}


def resolve_objective(objective: str | Objective) -> Objective:
    """A named objective (``entropy``) or a callable, unchanged."""
    if isinstance(objective, str):
        if objective not in OBJECTIVES:
            raise ValueError(
                f"`objective`={objective!r} is not supported; allowed: {', '.join(OBJECTIVES)} or a callable."
            )
        return OBJECTIVES[objective]
    if not callable(objective):
        raise TypeError(f"`objective` must be a name or a callable output -> loss; got {type(objective).__name__}.")
    return objective


def as_loss(result: "Tensor | Loss") -> Loss:
    """Check an objective's result: a scalar tensor (or a :class:`Loss` holding one)."""
    loss = result if isinstance(result, Loss) else Loss(result)
    if not isinstance(loss.value, Tensor) or loss.value.ndim != 0:
        got = f"shape {tuple(loss.value.shape)}" if isinstance(loss.value, Tensor) else type(loss.value).__name__
        raise ValueError(f"The test-time objective must return a scalar tensor; it returned {got}.")
    return loss
