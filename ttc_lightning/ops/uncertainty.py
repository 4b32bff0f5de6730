"""Uncertainty across views (augmented views, sampling draws), accumulated in constant memory in the number of views.

* ``std``: element-wise standard deviation across views (population, ``correction=0``) of the values in the merge
  space; same shape as the output. Works for every task.
* ``entropy``: predictive entropy ``H[mean_v p_v]`` in nats, over the class dimension (per label for sigmoid).
* ``mutual_info``: ``H[mean_v p_v] - mean_v H[p_v]`` (BALD): disagreement between views.
* ``agreement``: fraction of views whose predicted class equals the merged prediction's.

The last three need class outputs; their shape is the output's without the class dimension (softmax) or the
output's (sigmoid, per label).
"""

import torch
from torch import Tensor

from ttc_lightning.ops.activations import log_probs, probs
from ttc_lightning.ops.entropy import entropy_of_probs
from ttc_lightning.ops.merge import to_space

UNCERTAINTIES = ("std", "entropy", "mutual_info", "agreement")


def _decision(values: Tensor, activation: str, dim: int) -> Tensor:
    return values.argmax(dim) if activation == "softmax" else values > 0


class UncertaintyAccumulator:
    """Accumulates the requested uncertainty measures over stacks of views ``(k, *shape)``."""

    def __init__(self, names: tuple[str, ...], space: str, activation: str) -> None:
        self.names, self.space, self.activation = names, space, activation
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None
        self.prob_total: Tensor | None = None
        self.entropy_total: Tensor | None = None
        self.votes: Tensor | None = None

    def add(self, ys: Tensor) -> None:
        """Add a stack of de-augmented raw outputs (in the accumulation dtype)."""
        k = ys.shape[0]
        if "std" in self.names:
            values = to_space(ys, self.space, self.activation, 2)
            batch_mean = values.mean(0)
            batch_m2 = ((values - batch_mean) ** 2).sum(0)
            if self.mean is None or self.m2 is None:
                self.mean, self.m2 = batch_mean, batch_m2
            else:
                delta = batch_mean - self.mean
                total = self.count + k
                self.mean = self.mean + delta * (k / total)
                self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * k / total)
        if {"entropy", "mutual_info"} & set(self.names):
            p, log_p = probs(ys, self.activation, 2), log_probs(ys, self.activation, 2)
            self.prob_total = p.sum(0) if self.prob_total is None else self.prob_total + p.sum(0)
            if "mutual_info" in self.names:
                h = entropy_of_probs(p, log_p, self.activation, 2).sum(0)
                self.entropy_total = h if self.entropy_total is None else self.entropy_total + h
        if "agreement" in self.names:
            votes = self._votes(ys)
            self.votes = votes if self.votes is None else self.votes + votes
        self.count += k

    def keep(self, index: Tensor) -> None:
        """Keep only the samples at ``index`` along the output's batch dimension (for per-sample halting)."""
        for name in ("mean", "m2", "prob_total", "entropy_total", "votes"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index))

    def _votes(self, ys: Tensor) -> Tensor:
        """Per-class (softmax) or per-label (sigmoid) counts of views deciding for it; constant memory."""
        if self.activation == "sigmoid":
            return (ys > 0).sum(0)
        return torch.nn.functional.one_hot(ys.argmax(2), ys.shape[2]).sum(0)

    def result(self, merged: Tensor) -> dict[str, Tensor]:
        """The measures, given the merged output (for ``agreement``)."""
        out: dict[str, Tensor] = {}
        if "std" in self.names:
            assert self.m2 is not None
            out["std"] = (self.m2 / self.count).clamp(min=0).sqrt()
        if self.prob_total is not None:
            p_mean = self.prob_total / self.count
            h_mean = entropy_of_probs(p_mean, activation=self.activation, dim=1)
            if "entropy" in self.names:
                out["entropy"] = h_mean
            if "mutual_info" in self.names:
                assert self.entropy_total is not None
                out["mutual_info"] = (h_mean - self.entropy_total / self.count).clamp(min=0)
        if "agreement" in self.names:
            assert self.votes is not None
            counts = self.votes
            final = _decision(merged, self.activation, 1)
            if self.activation == "softmax":
                agree = counts.movedim(-1, 1).gather(1, final.unsqueeze(1)).squeeze(1)
            else:
                agree = torch.where(final, counts, self.count - counts)
            out["agreement"] = agree.to(merged.dtype) / self.count
        return out
