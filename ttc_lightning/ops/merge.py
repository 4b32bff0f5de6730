"""Running merges of view outputs, in constant memory in the number of views (``median`` excepted).

A view is one output per sample: a de-augmented test-time augmentation view, or one draw of iterative sampling.
Views arrive in stacks ``(k, *output_shape)``. The class dimension is dim 1 of the output (``(B, C)`` for
classification, ``(B, C, H, W)`` for segmentation).

Spaces:

* ``raw``: merge the model's outputs as they are (ttach's numbers).
* ``prob``: merge probabilities (softmax over the class dimension, or sigmoid for multi-label) and return their log
  (softmax) or logit (sigmoid), so the result is still a valid logit tensor.
* ``logprob``: merge log-probabilities; the result is returned as logits in the same way.

``gmean`` and ``tsharpen`` default to ``prob`` and are computed in the log domain there: ``gmean`` returns the mean
log-probability (the log of the normalised geometric mean), ``tsharpen`` the log of the mean square root of the
probabilities. In ``raw`` they follow ttach (product and square root of raw values) and require non-negative
outputs, where ttach returns NaN on negative logits. ``vote`` returns ``votes / n + mean_prob / (n + 1)`` per class:
its argmax is the majority class, ties broken by the mean probability.
"""

import torch
from torch import Tensor

from ttc_lightning.ops.activations import log_probs, logits_from_log_probs, probs

MERGES = ("mean", "sum", "max", "min", "median", "gmean", "tsharpen", "vote")
SPACES = ("raw", "prob", "logprob")
#: Merges that need a class dimension.
CLASS_MERGES = ("vote",)


def default_space(merge: str) -> str:
    """The space a merge uses when none is given."""
    return "prob" if merge in ("gmean", "tsharpen", "vote") else "raw"


def to_space(y: Tensor, space: str, activation: str, dim: int) -> Tensor:
    """Values of raw outputs ``y`` in ``space``."""
    if space == "raw":
        return y
    return probs(y, activation, dim) if space == "prob" else log_probs(y, activation, dim)


class Merger:
    """Merges stacks of view outputs as they arrive.

    Args:
        merge: one of :data:`MERGES`.
        space: one of :data:`SPACES`.
        activation: ``softmax`` (classes exclusive) or ``sigmoid`` (multi-label), used by ``prob``/``logprob`` and
            ``vote``.
    """

    def __init__(self, merge: str, space: str, activation: str) -> None:
        self.merge, self.space, self.activation = merge, space, activation
        self.count = 0
        self.total: Tensor | None = None
        self.prob_total: Tensor | None = None
        self.stored: list[Tensor] = []

    def add(self, ys: Tensor) -> None:
        """Add a stack ``(k, *shape)`` of de-augmented raw outputs (already in the accumulation dtype)."""
        self.count += ys.shape[0]
        if self.merge == "median":  # a copy: ``ys`` may be a view of a buffer the model reuses
            self.stored.append(to_space(ys, self.space, self.activation, 2).clone())
            return
        if self.merge == "vote":
            classes = ys.shape[2]
            votes = torch.nn.functional.one_hot(ys.argmax(2), classes).movedim(-1, 2).sum(0, dtype=ys.dtype)
            self._accumulate("total", votes)
            self._accumulate("prob_total", probs(ys, self.activation, 2).sum(0))
            return
        if self.merge == "gmean":
            values = log_probs(ys, self.activation, 2) if self.space == "prob" else self._raw_non_negative(ys).log()
        elif self.merge == "tsharpen":
            values = to_space(ys, self.space, self.activation, 2)
            values = (self._raw_non_negative(values) if self.space == "raw" else values).sqrt()
        else:
            values = to_space(ys, self.space, self.activation, 2)
        reduce = {"max": torch.amax, "min": torch.amin}.get(self.merge, torch.sum)
        self._accumulate("total", reduce(values, 0))

    def keep(self, index: Tensor) -> None:
        """Keep only the samples at ``index`` along the output's batch dimension (for per-sample halting)."""
        if self.merge == "median":
            raise ValueError("merge='median' keeps every view and cannot drop halted samples; pick another merge.")
        self.total = None if self.total is None else self.total.index_select(0, index)
        self.prob_total = None if self.prob_total is None else self.prob_total.index_select(0, index)

    def _accumulate(self, name: str, value: Tensor) -> None:
        """Out of place, so gradients can flow through a merge (e.g. marginal entropy over views)."""
        current = getattr(self, name)
        if current is not None:
            combine = {"max": torch.maximum, "min": torch.minimum}.get(self.merge, torch.add)
            value = combine(current, value) if name == "total" else current + value
        setattr(self, name, value)

    def _raw_non_negative(self, values: Tensor) -> Tensor:
        low = values.min()
        if low < 0:
            raise ValueError(
                f"`merge`={self.merge!r} with `space`='raw' needs non-negative outputs (ttach takes products and "
                f"square roots of raw values); got a minimum of {low.item():.4g}. Use space='prob' for logits."
            )
        return values

    def result(self) -> Tensor:
        """The merged output, in the accumulation dtype."""
        if self.merge == "median":
            stacked = torch.cat(self.stored).sort(0).values
            middle = (stacked[(self.count - 1) // 2] + stacked[self.count // 2]) / 2
            return self._from_space(middle)
        assert self.total is not None, "no views were added"
        if self.merge == "vote":
            assert self.prob_total is not None
            return self.total / self.count + self.prob_total / (self.count * (self.count + 1))
        if self.merge == "gmean":
            mean_log = self.total / self.count
            return mean_log.exp() if self.space == "raw" else logits_from_log_probs(mean_log, self.activation)
        merged = self.total if self.merge in ("sum", "max", "min") else self.total / self.count
        return self._from_space(merged)

    def _from_space(self, merged: Tensor) -> Tensor:
        if self.space == "raw":
            return merged
        log_p = merged.log() if self.space == "prob" else merged
        return logits_from_log_probs(log_p, self.activation)
