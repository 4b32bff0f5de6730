"""``SAR``: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023)."""

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import ClassVar

import torch
from torch import Tensor
from typing_extensions import override

from ttc_lightning.checks import check_positive, check_unused, moved_keywords
from ttc_lightning.ttt.base import TestTimeTraining
from ttc_lightning.ttt.objectives import Loss, entropy
from ttc_lightning.ttt.params import ParamSpec
from ttc_lightning.ttt.persistence import Persistence
from ttc_lightning.ttt.refusals import MOVED
from ttc_lightning.ttt.resets import Resets, episodic_resets
from ttc_lightning.ttt.updater import OptimizerFactory, Updates


class ReliableEntropy:
    """Mean entropy of the samples whose entropy is below ``e_margin * ln C`` (SAR's reliable-sample filter).

    Args:
        e_margin: threshold as a fraction of ``ln C``. Default ``0.4``.

    Raises:
        ValueError: for a non-positive ``e_margin``.
    """

    def __init__(self, e_margin: float = 0.4) -> None:
        self.e_margin = check_positive("e_margin", e_margin, " (a fraction of ln C)")
        #: Samples allowed at all (SAR's second pass only considers those kept by the first).
        self.restrict: Tensor | None = None

    def __call__(self, output: Tensor) -> Loss:
        ent = entropy(output)
        kept = ent.detach() < self.e_margin * math.log(output.shape[1])
        if self.restrict is not None:
            kept &= self.restrict
        return Loss(ent[kept].mean(), kept)


class SAR(TestTimeTraining):
    """SAR: reliable-sample entropy minimisation with a sharpness-aware (SAM) step and reset on collapse.

    Per batch: entropy of the samples under the threshold ``e_margin * ln C``; backward; the adapted parameters are
    moved to ``theta + rho * g / ||g||``; the entropy is recomputed there on the samples that passed the first filter
    and pass it again; its gradient updates the original parameters. When the running average (0.9) of the second
    loss falls below ``reset_below`` the model resets to the source (collapse). The prediction is the first
    forward's output, before the update. Stable at batch size 1 with GroupNorm/LayerNorm models (use ``params="norm"``).

    Args:
        optimizer: base optimizer factory. Default ``functools.partial(torch.optim.SGD, lr=0.00025, momentum=0.9)``
            (the paper's setting at batch size 64).
        rho: SAM neighbourhood radius. Default ``0.05``.
        e_margin: entropy threshold as a fraction of ``ln C``. Default ``0.4``.
        reset_below: collapse threshold on the loss average (not with ``episodic``, which resets every batch).
            Default ``0.2``.
        steps: updates per batch. Default ``1``.
        episodic: reset before every batch. With ``steps=1`` it needs ``persistence.keep_adapted`` or a composed
            TTA, else every prediction is the source model's (refused). Default ``False``.
        params: which parameters adapt. Default ``"norm"`` (BatchNorm, GroupNorm, LayerNorm affine parameters; the
            paper also freezes the deepest blocks, which is model-specific: pass a list or ``"re:<pattern>"``).
        updates: scheduler, clipping, early stop and sync of the updates (:class:`~ttc_lightning.Updates`).
        resets: further resets (:class:`~ttc_lightning.Resets`; ``every`` is refused with ``episodic=True``,
            ``on_collapse`` always: ``reset_below`` sets it).
        persistence: keep, save and resume the adaptation (:class:`~ttc_lightning.Persistence`).
        flags: per-sample ``kept`` and ``skipped`` extras (see :class:`~ttc_lightning.TestTimeTraining`). Default
            ``False``.
        stages: Trainer stages to act in. Default ``("predict",)``.

    Raises:
        ValueError: for a bad value or an argument that cannot act given the others (by name, with why and a remedy).
    """

    requires_optimizer: ClassVar[bool] = True

    @moved_keywords({**MOVED, "reset_on_collapse": "reset_below=..."}, "a new argument")
    def __init__(
        self,
        optimizer: OptimizerFactory = functools.partial(torch.optim.SGD, lr=0.00025, momentum=0.9),  # noqa: B008
        rho: float = 0.05,
        e_margin: float = 0.4,
        reset_below: float = 0.2,
        steps: int = 1,
        episodic: bool = False,
        params: ParamSpec = "norm",
        updates: Updates = Updates(),  # noqa: B008 (frozen)
        resets: Resets = Resets(),  # noqa: B008 (frozen)
        persistence: Persistence = Persistence(),  # noqa: B008 (frozen)
        flags: bool = False,
        stages: Sequence[str] = ("predict",),
    ) -> None:
        if isinstance(reset_below, bool) or not isinstance(reset_below, int | float) or reset_below < 0:
            raise ValueError(f"`reset_below`={reset_below!r} must be a non-negative number.")
        resets = episodic_resets(episodic, resets)
        why = "SAR resets on a collapse of its loss average below `reset_below`, which sets this threshold"
        check_unused("resets.on_collapse", resets.on_collapse, None, why, "Use reset_below or drop it")
        if resets.every in ("batch", 1):
            given = "episodic=True resets before every batch" if episodic else "resets.every=1 after every update"
            why = f"it is the collapse threshold of a reset, and {given}"
            check_unused("reset_below", reset_below, 0.2, why, "Use episodic=False (and resets.every > 1) or drop it")
        self.reliable = ReliableEntropy(e_margin)
        super().__init__(
            optimizer=optimizer,
            objective=self.reliable,
            params=params,
            norm="batch",
            steps=steps,
            updates=updates,
            resets=replace(resets, on_collapse=None if resets.every in ("batch", 1) else reset_below),
            persistence=persistence,
            flags=flags,
            stages=stages,
        )
        self.rho = check_positive("rho", rho)

    @override
    def apply_gradients(self, loss: Loss, recompute: Callable[[], Loss]) -> float | None:
        """SAM: gradient at ``theta + rho * g / ||g||`` on the samples kept at ``theta`` and again there."""
        if super().apply_gradients(loss, recompute) is None:
            return None  # no reliable sample (on any rank, with sync)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        if not all(torch.isfinite(g).all() for g in grads):  # (the same on every rank with sync: averaged)
            assert self.updater is not None
            self.updater.skip("gradients")  # a non-finite step direction would perturb every parameter to NaN
            return None
        scale = self.rho / (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) + 1e-12)
        originals = [p.detach().clone() for p in self._params]
        with torch.no_grad():
            for p, g in zip(self._params, grads, strict=True):
                p.add_(g * scale)
                p.grad = None
        self.reliable.restrict = loss.kept
        try:
            second = recompute()
        finally:
            self.reliable.restrict = None
        value = super().apply_gradients(second, recompute)  # None when no sample passes the second filter
        with torch.no_grad():
            for p, original in zip(self._params, originals, strict=True):
                p.copy_(original)
        return value
