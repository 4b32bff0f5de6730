"""``Tent``: test entropy minimisation (Wang et al., ICLR 2021)."""

import functools
from typing import Any, ClassVar

import torch

from ttc_lightning.checks import check_bool
from ttc_lightning.ttt.base import BATCH_STATISTICS, OptimizerFactory, TestTimeTraining
from ttc_lightning.ttt.params import ParamSpec


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
        episodic: reset the model and the optimizer before every batch. With ``steps=1`` it needs ``keep_adapted`` or a
            composed TTA, else every prediction is the source model's (refused). Default ``False``.
        params: which parameters adapt. Default ``"batchnorm"``.
        **options: further :class:`~ttc_lightning.TestTimeTraining` arguments (``keep_adapted``, ``stages``,
            ``scheduler``, ``clip_grad``, ``save_every_n_batches``, ``resume_from``, ...).

    Example::

        trainer = L.Trainer(callbacks=[ttc.Tent(optimizer=functools.partial(torch.optim.Adam, lr=1e-3))])
    """

    fixed_options: ClassVar[tuple[str, ...]] = ("objective", "norm", "reset")
    unused_options: ClassVar[dict[str, str]] = BATCH_STATISTICS
    requires_optimizer: ClassVar[bool] = True

    def __init__(
        self,
        optimizer: OptimizerFactory = functools.partial(torch.optim.Adam, lr=1e-3),  # noqa: B008
        steps: int = 1,
        episodic: bool = False,
        params: ParamSpec = "batchnorm",
        **options: Any,
    ) -> None:
        self.check_options(options)
        super().__init__(
            optimizer=optimizer,
            objective="entropy",
            params=params,
            norm="batch",
            steps=steps,
            reset="batch" if check_bool("episodic", episodic) else "never",
            **options,
        )
