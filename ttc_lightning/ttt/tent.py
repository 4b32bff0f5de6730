"""``Tent``: test entropy minimisation (Wang et al., ICLR 2021)."""

import functools
from collections.abc import Sequence
from typing import ClassVar

import torch

from ttc_lightning.ttt.base import TestTimeTraining
from ttc_lightning.ttt.params import ParamSpec
from ttc_lightning.ttt.persistence import Persistence
from ttc_lightning.ttt.refusals import refuse_moved
from ttc_lightning.ttt.resets import Resets, episodic_resets
from ttc_lightning.ttt.updater import OptimizerFactory, Updates


class Tent(TestTimeTraining):
    """TENT: minimise the prediction entropy over the affine parameters of the BatchNorm layers.

    As in the authors' ``tent.py``: BatchNorm layers normalise with batch statistics (running statistics unused),
    only their affine weight and bias adapt, the loss is the batch mean of ``-(softmax * log_softmax).sum(1)``, each
    step is forward, backward, step, zero grad, and a batch's prediction is the output computed before its last
    update. Differences: ``tent.py`` handles ``BatchNorm2d`` only and calls ``model.train()``, which also enables
    dropout; here the whole BatchNorm family adapts and every other layer stays in eval mode (as in the large
    test-time adaptation benchmark repositories).

    Args:
        optimizer: optimizer factory. Default ``functools.partial(torch.optim.Adam, lr=1e-3)`` (tent's CIFAR
            setting; its ImageNet setting is SGD, lr 0.00025, momentum 0.9).
        steps: updates per batch. Default ``1``.
        episodic: reset the model and the optimizer before every batch. With ``steps=1`` it needs
            ``persistence.keep_adapted`` or a composed TTA, else every prediction is the source model's (refused).
            Default ``False``.
        params: which parameters adapt. Default ``"batchnorm"``.
        updates: scheduler, clipping, early stop and sync of the updates (:class:`~ttc_lightning.Updates`).
        resets: further resets (:class:`~ttc_lightning.Resets`; ``every`` is refused with ``episodic=True``).
        persistence: keep, save and resume the adaptation (:class:`~ttc_lightning.Persistence`).
        flags: per-sample ``kept`` and ``skipped`` extras (see :class:`~ttc_lightning.TestTimeTraining`). Default
            ``False``.
        stages: Trainer stages to act in. Default ``("predict",)``.

    Raises:
        ValueError: for a bad value or an argument that cannot act given the others (by name, with why and a remedy).

    Example::

        trainer = L.Trainer(callbacks=[ttc.Tent(optimizer=functools.partial(torch.optim.Adam, lr=1e-3))])
    """

    requires_optimizer: ClassVar[bool] = True

    @refuse_moved
    def __init__(
        self,
        optimizer: OptimizerFactory = functools.partial(torch.optim.Adam, lr=1e-3),  # noqa: B008
        steps: int = 1,
        episodic: bool = False,
        params: ParamSpec = "batchnorm",
        updates: Updates = Updates(),  # noqa: B008 (frozen)
        resets: Resets = Resets(),  # noqa: B008 (frozen)
        persistence: Persistence = Persistence(),  # noqa: B008 (frozen)
        flags: bool = False,
        stages: Sequence[str] = ("predict",),
    ) -> None:
        super().__init__(
            optimizer=optimizer,
            objective="entropy",
            params=params,
            norm="batch",
            steps=steps,
            updates=updates,
            resets=episodic_resets(episodic, resets),
            persistence=persistence,
            flags=flags,
            stages=stages,
        )
