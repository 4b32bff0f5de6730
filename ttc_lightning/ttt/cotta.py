"""``CoTTA``: continual test-time adaptation (Wang, Fink, Van Gool and Dai, CVPR 2022)."""

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from typing_extensions import override

from ttc_lightning.checks import check_int, check_range, check_unused
from ttc_lightning.ops.augmix import RandomAugment, check_image_batch
from ttc_lightning.ops.entropy import soft_cross_entropy
from ttc_lightning.pipeline import Forward, Inner, Output
from ttc_lightning.ttt.anchoring import EMATeacher, StochasticRestore, swapped
from ttc_lightning.ttt.base import TestTimeTraining
from ttc_lightning.ttt.objectives import Loss, check_logits
from ttc_lightning.ttt.params import ParamSpec
from ttc_lightning.ttt.persistence import Persistence
from ttc_lightning.ttt.refusals import refuse_moved
from ttc_lightning.ttt.resets import Resets
from ttc_lightning.ttt.updater import OptimizerFactory, Updates


class CoTTA(TestTimeTraining):
    """CoTTA: a student trained on an EMA teacher's (augmentation-averaged) predictions, with stochastic restore.

    Per batch, as in the authors' code: the source model's mean top-1 confidence on the batch decides whether the
    teacher's target is its plain output (confidence ``>= anchor_threshold``) or the mean of its logits over
    ``views`` random augmentations; the student minimises the cross entropy ``-(softmax(target) *
    log_softmax(student)).sum(1)`` averaged over the batch; after the step the teacher's parameters move as
    ``ema * teacher + (1 - ema) * student`` and each adapted element of the student returns to its source value with
    probability ``restore_prob`` (masks drawn from a generator seeded with the augmentation's seed, the same on
    every rank). Alone, the batch's prediction is that target, as in the authors' code: the teacher's
    augmentation-averaged logits when the source is unsure, else its plain output, computed before the teacher's
    update. All BatchNorm layers (student, teacher, source) normalise with batch statistics.

    Differences from the authors' code (``qinenergy/cotta``, ``cifar/cotta.py``):

    * Augmentations: ``RandomAugment``, an AugMix-style family (chains of rotate, shear, translate, scale, hflip,
      brightness, contrast, blur and noise, mixed with Dirichlet weights and blended with the input), with
      magnitudes relative to each image's statistics, so any input range works. The authors use a fixed torchvision
      pipeline for ``[0, 1]`` images: colour jitter (brightness, contrast, saturation, hue, gamma), edge padding
      and a random affine (rotation up to 15 degrees, translation 1/16, scale 0.9-1.1), Gaussian blur, a
      horizontal flip with probability 0.5, Gaussian noise (std 0.005) and clipping to ``[0, 1]``.
    * Draws: every sample of every view gets its own random parameters; the authors' transforms, applied to the
      whole batch tensor, draw one set of parameters per view for the whole batch (only the noise is per pixel).
    * The ``views`` augmented teacher forwards run only when the source is unsure (the authors run all 32 on every
      batch and discard them when it is confident): the same target, less compute, a different random stream.
    * Restore masks come from a private generator (``augment.seed``), not the global torch RNG; a skipped update
      (non-finite loss or gradients) also skips the teacher's update and the restore.
    * The model stays in eval mode (dropout off); the authors call ``model.train()``.
    * Composed with ``TestTimeAugmentation``, the loss is unchanged (the student, teacher and source run on the
      input itself), but the prediction is one extra forward: the augmented-and-merged output of the teacher after
      the batch's last update and restore, not the target; the authors have no such composition.

    Args:
        optimizer: optimizer factory. Default ``functools.partial(torch.optim.Adam, lr=1e-3)`` (CIFAR setting).
        ema: teacher momentum; ``1`` (a frozen teacher: every prediction the source model's) needs
            ``keep_adapted=True``. Default ``0.999``.
        restore_prob: stochastic-restore probability. Default ``0.01``.
        anchor_threshold: source-confidence threshold below which the teacher averages augmentations. Default
            ``0.92`` (CIFAR-10; the paper uses 0.72 for CIFAR-100, 0.1 for ImageNet).
        views: augmentations averaged by the teacher. Default ``32``.
        augment: the random augmentation. Default ``RandomAugment()`` (seed 0 + rank).
        params: which parameters adapt. Default ``"all"``.
        steps: updates per batch. Default ``1``.
        updates: scheduler, clipping, early stop and sync of the updates (:class:`~ttc_lightning.Updates`).
        resets: further resets (:class:`~ttc_lightning.Resets`; CoTTA is continual by default).
        persistence: keep, save and resume the adaptation (:class:`~ttc_lightning.Persistence`).
        flags: per-sample ``kept`` and ``skipped`` extras (see :class:`~ttc_lightning.TestTimeTraining`). Default
            ``False``.
        stages: Trainer stages to act in. Default ``("predict",)``.

    Raises:
        ValueError: for a bad value or an argument that cannot act given the others (by name, with why and a remedy).
        TypeError: for an ``augment`` that is not a ``ttc.RandomAugment``.
    """

    requires_optimizer: ClassVar[bool] = True

    @refuse_moved
    def __init__(
        self,
        optimizer: OptimizerFactory = functools.partial(torch.optim.Adam, lr=1e-3),  # noqa: B008
        ema: float = 0.999,
        restore_prob: float = 0.01,
        anchor_threshold: float = 0.92,
        views: int = 32,
        augment: RandomAugment | None = None,
        params: ParamSpec = "all",
        steps: int = 1,
        updates: Updates = Updates(),  # noqa: B008 (frozen)
        resets: Resets = Resets(),  # noqa: B008 (frozen)
        persistence: Persistence = Persistence(),  # noqa: B008 (frozen)
        flags: bool = False,
        stages: Sequence[str] = ("predict",),
    ) -> None:
        if augment is not None and not isinstance(augment, RandomAugment):
            raise TypeError(
                f"`augment`={augment!r} must be a ttc.RandomAugment (CoTTA seeds its restore masks from it and saves "
                "its generator) or None."
            )
        self.augment = augment or RandomAugment()
        self.teacher = EMATeacher(ema)
        self.restore = StochasticRestore(restore_prob, seed=self.augment.seed)
        super().__init__(
            optimizer=optimizer,
            params=params,
            norm="batch",
            steps=steps,
            updates=updates,
            resets=resets,
            persistence=persistence,
            anchors=(self.teacher, self.restore),
            flags=flags,
            stages=stages,
        )
        self.ema = self.teacher.momentum
        if self.ema == 1 and not persistence.keep_adapted:
            raise ValueError(
                "`ema`=1.0 leaves the `optimizer` without effect: it freezes the teacher, whose output is CoTTA's "
                "prediction, so no update of the student ever reaches one (they are the source model's). Use ema < 1, "
                "or persistence=Persistence(keep_adapted=True) to keep the trained student."
            )
        self.restore_prob = self.restore.prob
        self.anchor_threshold = check_range("anchor_threshold", anchor_threshold, 0, 1)
        self.views = check_int("views", views, 1)
        if self.anchor_threshold == 0:
            why = "the teacher averages augmented views only when the source's confidence is below anchor_threshold"
            why += ", and anchor_threshold=0"
            check_unused("views", views, 32, why, "Use anchor_threshold > 0 or drop views")
            if self.restore_prob == 0:
                why += " (and restore_prob=0, so its seed draws no restore masks either)"
                check_unused("augment", augment, None, why, "Use anchor_threshold > 0 or drop augment")

    @override
    def prepare(self, model: Forward) -> None:
        self.augment.reseed()
        self.reset_state()

    @override
    def reset_state(self) -> None:
        self.anchor_confidence = float("nan")

    @override
    def loss(self, forward: Forward, x: Tensor, args: tuple, kwargs: dict) -> tuple[Loss, Any]:
        check_image_batch(x, "CoTTA (its teacher averages random image augmentations)")
        with torch.no_grad():
            with swapped(self._params, self.restore.values):
                source = check_logits(forward(x, *args, **kwargs), "CoTTA")
                self.anchor_confidence = source.softmax(1).amax(1).mean().item()
            with swapped(self._params, self.teacher.values):
                target = forward(x, *args, **kwargs)
                if self.anchor_confidence < self.anchor_threshold:
                    # all views drawn in one call (per-sample draws), then one forward per view as in CoTTA
                    views = self.augment(x.repeat(self.views, *[1] * (x.ndim - 1))).chunk(self.views)
                    target = torch.stack([forward(view, *args, **kwargs) for view in views]).mean(0)
        student = forward(x, *args, **kwargs)
        loss = soft_cross_entropy(student, target).mean()
        return Loss(loss), target

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"augment": self.augment.state_dict()}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.augment.load_state_dict(state["augment"])

    @override
    def predict(self, inner: Inner, x: Tensor, args: tuple, kwargs: dict, output: Any) -> Output:
        if not inner.composed:
            return Output(output)
        with torch.no_grad(), swapped(self._params, self.teacher.values):
            return inner.forward(x, *args, **kwargs)
