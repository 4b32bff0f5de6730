"""``EATA``: efficient anti-forgetting test-time adaptation (Niu et al., ICML 2022)."""

import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from ttc_lightning.checks import check_bool, check_positive, check_unused
from ttc_lightning.pipeline import Forward
from ttc_lightning.ttt.base import TestTimeTraining
from ttc_lightning.ttt.objectives import Loss, entropy
from ttc_lightning.ttt.params import ParamSpec
from ttc_lightning.ttt.persistence import Persistence
from ttc_lightning.ttt.refusals import refuse_moved
from ttc_lightning.ttt.resets import Resets, episodic_resets
from ttc_lightning.ttt.updater import OptimizerFactory, Updates

#: Smoothing of EATA's moving average of kept predictions.
PROBS_SMOOTHING = 0.9


class EATAObjective:
    """EATA's sample-efficient entropy: reliable (low-entropy) and non-redundant samples, re-weighted.

    A sample is kept when its entropy is below ``e_margin * ln C`` and, once a moving average ``m`` of the kept
    samples' probabilities exists, ``|cos(m, p)| < d_margin``. Kept samples are weighted by
    ``exp(-(entropy - e_margin * ln C))`` (detached); the loss is the mean weighted entropy of the kept samples.
    ``m`` is updated as ``0.9 m + 0.1 mean(p of kept)`` on every batch, with or without an update.

    Args:
        e_margin: entropy threshold as a fraction of ``ln C`` (``C`` classes). Default ``0.4``.
        d_margin: cosine-similarity threshold of the redundancy filter. Default ``0.05``.

    Raises:
        ValueError: for a non-positive ``e_margin`` or a ``d_margin`` outside ``(0, 1]``.
    """

    def __init__(self, e_margin: float = 0.4, d_margin: float = 0.05) -> None:
        check_positive("e_margin", e_margin, " (a fraction of ln C)")
        if not 0 < d_margin <= 1:
            raise ValueError(f"`d_margin`={d_margin!r} must lie in (0, 1].")
        self.e_margin, self.d_margin = e_margin, d_margin
        self.probs_average: Tensor | None = None

    def __call__(self, output: Tensor) -> Loss:
        ent = entropy(output)
        margin = self.e_margin * math.log(output.shape[1])
        probs = output.detach().float().softmax(1)
        kept = ent.detach() < margin
        if self.probs_average is not None:
            similarity = F.cosine_similarity(self.probs_average.unsqueeze(0), probs, dim=1)
            kept &= similarity.abs() < self.d_margin
        if kept.any():
            mean = probs[kept].mean(0)
            self.probs_average = (
                mean
                if self.probs_average is None
                else PROBS_SMOOTHING * self.probs_average + (1 - PROBS_SMOOTHING) * mean
            )
        chosen = ent[kept]
        weights = torch.exp(-(chosen.detach() - margin))
        return Loss((chosen * weights).mean(), kept)


class EATA(TestTimeTraining):
    """EATA: entropy minimisation on reliable, non-redundant samples, with an optional Fisher regulariser.

    Samples with high entropy or predictions redundant with recent ones are excluded (see :class:`EATAObjective`);
    batches with no sample left take no backward pass (counted: compare :attr:`backwards` with the batches seen).
    With ``fisher_data`` (clean, in-distribution inputs) the loss adds ``fisher_alpha * sum(F * (theta -
    theta_0)^2)`` over the adapted parameters, ``F`` the diagonal Fisher of the pseudo-label cross entropy on that
    data (anti-forgetting). Thresholds scale with ``ln C`` for ``C`` classes. The prediction is the output before
    the batch's update, as in TENT.

    Args:
        optimizer: optimizer factory. Default ``functools.partial(torch.optim.SGD, lr=0.00025, momentum=0.9)``
            (the paper's ImageNet setting at batch size 64).
        e_margin: entropy threshold as a fraction of ``ln C``. Default ``0.4``.
        d_margin: redundancy threshold on the cosine similarity. Default ``0.05`` (the paper's ImageNet value). With
            few classes, cosine similarities between probability vectors are large and 0.05 rejects almost every
            sample after the first batch: raise it (e.g. 0.4 for 10 classes). Refused with ``episodic=True`` and
            ``steps=1``, which clear the filter's moving average before every batch.
        fisher_data: an iterable of clean input batches (tensors, or tuples/lists whose first element is the input)
            to estimate the Fisher information at the start of each stage, or ``None`` for no regulariser (ETA).
            Default ``None``.
        fisher_alpha: weight of the Fisher regulariser (needs ``fisher_data``; ``0`` with ``fisher_data`` is refused,
            as the estimate would go unused). Default ``2000.0``.
        steps: updates per batch. Default ``1``.
        episodic: reset before every batch. With ``steps=1`` it needs ``persistence.keep_adapted`` or a composed
            TTA, else every prediction is the source model's (refused). Default ``False``.
        params: which parameters adapt. Default ``"batchnorm"``.
        updates: scheduler, clipping, early stop and sync of the updates (:class:`~ttc_lightning.Updates`).
        resets: further resets (:class:`~ttc_lightning.Resets`; ``every`` is refused with ``episodic=True``).
        persistence: keep, save and resume the adaptation (:class:`~ttc_lightning.Persistence`).
        flags: per-sample ``kept`` and ``skipped`` extras (see :class:`~ttc_lightning.TestTimeTraining`). Default
            ``False``.
        stages: Trainer stages to act in. Default ``("predict",)``.

    Raises:
        ValueError: for a bad value or an argument that cannot act given the others (by name, with why and a remedy).
    """

    requires_optimizer: ClassVar[bool] = True

    @refuse_moved
    def __init__(
        self,
        optimizer: OptimizerFactory = functools.partial(torch.optim.SGD, lr=0.00025, momentum=0.9),  # noqa: B008
        e_margin: float = 0.4,
        d_margin: float = 0.05,
        fisher_data: Iterable[Any] | None = None,
        fisher_alpha: float = 2000.0,
        steps: int = 1,
        episodic: bool = False,
        params: ParamSpec = "batchnorm",
        updates: Updates = Updates(),  # noqa: B008 (frozen)
        resets: Resets = Resets(),  # noqa: B008 (frozen)
        persistence: Persistence = Persistence(),  # noqa: B008 (frozen)
        flags: bool = False,
        stages: Sequence[str] = ("predict",),
    ) -> None:
        self.eata = EATAObjective(e_margin, d_margin)
        if check_bool("episodic", episodic) and steps == 1:
            why = (
                "the redundancy filter compares each sample with the moving average of earlier batches' predictions, "
                "which episodic=True clears before every batch (and with steps=1 no later step sees it)"
            )
            check_unused("d_margin", d_margin, 0.05, why, "Use episodic=False or steps > 1")
        super().__init__(
            optimizer=optimizer,
            objective=self.eata,
            params=params,
            norm="batch",
            steps=steps,
            updates=updates,
            resets=episodic_resets(episodic, resets),
            persistence=persistence,
            flags=flags,
            stages=stages,
        )
        if isinstance(fisher_alpha, bool) or not isinstance(fisher_alpha, int | float) or fisher_alpha < 0:
            raise ValueError(f"`fisher_alpha`={fisher_alpha!r} must be a non-negative number.")
        if fisher_data is not None and (isinstance(fisher_data, str | Tensor) or not isinstance(fisher_data, Iterable)):
            raise TypeError(
                f"`fisher_data` must be an iterable of input batches (a DataLoader, or a list such as [x]) or None; "
                f"got {type(fisher_data).__name__} (a tensor would be iterated row by row)."
            )
        if fisher_data is None:
            why = "it weighs the Fisher regulariser, which needs `fisher_data` (clean inputs), and fisher_data=None"
            check_unused("fisher_alpha", fisher_alpha, 2000.0, why, "Pass `fisher_data` or drop it")
        elif fisher_alpha == 0:
            raise ValueError(
                "`fisher_data` has no effect: it estimates the Fisher regulariser, whose weight is fisher_alpha=0. "
                "Use fisher_alpha > 0, or drop fisher_data (no regulariser, ETA)."
            )
        self.fisher_data, self.fisher_alpha = fisher_data, fisher_alpha
        self.fisher: list[Tensor] | None = None

    @override
    def prepare(self, model: Forward) -> None:
        self.eata.probs_average = None
        self._anchor = [p.detach().clone() for p in self._params]
        self.fisher = self._estimate_fisher(model) if self.fisher_data is not None else None

    def _estimate_fisher(self, model: Forward) -> list[Tensor]:
        """Mean over batches of the squared gradients of the pseudo-label cross entropy (EATA's estimate)."""
        assert self.fisher_data is not None
        device = self._params[0].device
        totals = [torch.zeros_like(p) for p in self._params]
        batches = 0
        with torch.enable_grad():
            for batch in self.fisher_data:
                x = batch if isinstance(batch, Tensor) else batch[0]
                output = model(x.to(device))
                loss = F.cross_entropy(output, output.argmax(1))
                grads = torch.autograd.grad(loss, self._params, allow_unused=True)
                for total, grad in zip(totals, grads, strict=True):
                    if grad is not None:
                        total += grad.detach() ** 2
                batches += 1
        if batches == 0:
            raise ValueError("`fisher_data` yielded no batch; pass clean input batches or None.")
        return [total / batches for total in totals]

    @override
    def loss(self, forward: Forward, x: Tensor, args: tuple, kwargs: dict) -> tuple[Loss, Any]:
        loss, output = super().loss(forward, x, args, kwargs)
        if self.fisher is not None and self.fisher_alpha > 0:
            penalty = sum(
                (f * (p - p0) ** 2).sum() for f, p, p0 in zip(self.fisher, self._params, self._anchor, strict=True)
            )
            loss = Loss(loss.value + self.fisher_alpha * penalty, loss.kept)
        return loss, output

    @override
    def reset_state(self) -> None:
        self.eata.probs_average = None

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"probs_average": self.eata.probs_average, "fisher": self.fisher, "anchor": self._anchor}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.eata.probs_average, self.fisher, self._anchor = state["probs_average"], state["fisher"], state["anchor"]
