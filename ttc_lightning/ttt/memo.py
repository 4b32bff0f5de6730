"""``MEMO``: marginal entropy minimisation with one test point (Zhang, Levine and Finn, NeurIPS 2022)."""

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from typing_extensions import override

from ttc_lightning.checks import check_int, check_range, check_unused
from ttc_lightning.ops import entropy as ops_entropy
from ttc_lightning.ops.augmix import RandomAugment, check_image_batch
from ttc_lightning.pipeline import Forward, Inner, Output
from ttc_lightning.tta.augmenter import Augmenter, repeat_batch_first
from ttc_lightning.tta.transforms import TransformSpec
from ttc_lightning.ttt.base import TestTimeTraining
from ttc_lightning.ttt.norm import NormStatistics
from ttc_lightning.ttt.objectives import Loss, check_logits
from ttc_lightning.ttt.params import ParamSpec
from ttc_lightning.ttt.persistence import Persistence
from ttc_lightning.ttt.refusals import refuse_moved
from ttc_lightning.ttt.resets import Resets, episodic_resets
from ttc_lightning.ttt.updater import OptimizerFactory, Updates


def marginal_entropy(logits: Tensor) -> Tensor:
    """Mean over samples of the entropy of the views' average probability; ``logits`` is ``(views, B, C)``."""
    return ops_entropy.marginal_entropy(logits).mean()


class MEMO(TestTimeTraining):
    """MEMO: minimise the entropy of the prediction averaged over random augmentations of each input.

    Per batch: ``views`` random AugMix-style views of every input (:class:`~ttc_lightning.ops.augmix.RandomAugment`),
    loss = mean over inputs of ``H(mean over views of softmax)``, one update of all parameters, then the prediction
    is a forward of the original input through the updated model (MEMO predicts after its update: one extra
    forward); episodic by default (reset to the source before every batch). The paper adapts one test point at a
    time: use ``batch_size=1`` for that setting; with larger batches the update uses the batch's mean marginal
    entropy. BatchNorm layers mix source and test statistics with weight ``alpha`` on the source (the paper's prior
    strength 16 for one point: ``16 / 17``).

    Args:
        optimizer: optimizer factory. Default ``functools.partial(torch.optim.SGD, lr=0.005)`` (the paper's
            CIFAR-10 ResNet setting).
        views: augmented views per input. Default ``16``.
        augment: the random augmentation. Default ``RandomAugment()`` (seed 0 + rank).
        transforms: deterministic test-time augmentation views instead of random ones (an alias such as ``"d4"``, or
            anything ``TestTimeAugmentation(transforms=...)`` takes); ``views`` and ``augment`` are then refused.
            Default ``None``.
        alpha: source weight of the BatchNorm statistics (refused at the start of a stage on a model without
            BatchNorm running statistics). Default ``16 / 17``.
        steps: updates per batch. Default ``1``.
        episodic: reset before every batch. Default ``True``.
        params: which parameters adapt. Default ``"all"``.
        updates: scheduler, clipping, early stop and sync of the updates (:class:`~ttc_lightning.Updates`).
        resets: further resets (:class:`~ttc_lightning.Resets`; ``every`` is refused with ``episodic=True``).
        persistence: keep, save and resume the adaptation (:class:`~ttc_lightning.Persistence`).
        flags: per-sample ``kept`` and ``skipped`` extras (see :class:`~ttc_lightning.TestTimeTraining`). Default
            ``False``.
        stages: Trainer stages to act in. Default ``("predict",)``.

    Raises:
        ValueError: for a bad value or an argument that cannot act given the others (by name, with why and a remedy).
        TypeError: for an ``augment`` that is not a ``ttc.RandomAugment``.
    """

    requires_optimizer: ClassVar[bool] = True
    predicts_before_update: ClassVar[bool] = False

    @refuse_moved
    def __init__(
        self,
        optimizer: OptimizerFactory = functools.partial(torch.optim.SGD, lr=0.005),  # noqa: B008
        views: int = 16,
        augment: RandomAugment | None = None,
        transforms: TransformSpec | None = None,
        alpha: float = 16 / 17,
        steps: int = 1,
        episodic: bool = True,
        params: ParamSpec = "all",
        updates: Updates = Updates(),  # noqa: B008 (frozen)
        resets: Resets = Resets(),  # noqa: B008 (frozen)
        persistence: Persistence = Persistence(),  # noqa: B008 (frozen)
        flags: bool = False,
        stages: Sequence[str] = ("predict",),
    ) -> None:
        check_range("alpha", alpha, 0, 1)
        if transforms is not None:
            why = "with `transforms` the views are the deterministic test-time augmentation views"
            check_unused("views", views, 16, why, "Drop `transforms` for random views, or drop views")
            check_unused("augment", augment, None, why, "Drop `transforms` for random views, or drop augment")
        super().__init__(
            optimizer=optimizer,
            params=params,
            norm=NormStatistics("mix", alpha=alpha),
            steps=steps,
            updates=updates,
            resets=episodic_resets(episodic, resets),
            persistence=persistence,
            flags=flags,
            stages=stages,
        )
        self.norm_arguments = {} if alpha == 16 / 17 else {"alpha": alpha}  # MEMO sets norm="mix" itself
        self.views = check_int("views", views, 1)
        if augment is not None and not isinstance(augment, RandomAugment):
            raise TypeError(
                f"`augment`={augment!r} must be a ttc.RandomAugment (MEMO reseeds and saves its generator) or None; "
                "for deterministic views pass `transforms`."
            )
        self.augment = augment or RandomAugment()
        self.tta_views = None if transforms is None else Augmenter(transforms).views

    @override
    def prepare(self, model: Forward) -> None:
        self.augment.reseed()

    @override
    def loss(self, forward: Forward, x: Tensor, args: tuple, kwargs: dict) -> tuple[Loss, Any]:
        if self.tta_views is not None:  # deterministic views, possibly of different shapes: one forward each
            logits = torch.stack(
                [check_logits(forward(view.augment(x), *args, **kwargs), "MEMO") for view in self.tta_views]
            )
            return Loss(marginal_entropy(logits)), None
        check_image_batch(x, "MEMO (random views)", " For other inputs pass `transforms` (e.g. 'multiply').")
        batch = x.shape[0]
        views = self.augment(x.repeat(self.views, *[1] * (x.ndim - 1)))  # per-sample draws, in one call
        extra = [repeat_batch_first(a, batch, self.views) for a in args]
        named = {k: repeat_batch_first(v, batch, self.views) for k, v in kwargs.items()}
        logits = check_logits(forward(views, *extra, **named), "MEMO")
        return Loss(marginal_entropy(logits.unflatten(0, (self.views, batch)))), None

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"augment": self.augment.state_dict()}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.augment.load_state_dict(state["augment"])

    @override
    def predict(self, inner: Inner, x: Tensor, args: tuple, kwargs: dict, output: Any) -> Output:
        with torch.no_grad():
            return inner.forward(x, *args, **kwargs)
