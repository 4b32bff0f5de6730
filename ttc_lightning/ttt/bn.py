"""``BatchNormAdapt``: statistics-only test-time adaptation of BatchNorm layers."""

from typing import Any, ClassVar

from ttc_lightning.checks import check_range
from ttc_lightning.ttt.base import TestTimeTraining


class BatchNormAdapt(TestTimeTraining):
    """Normalises with test-batch statistics instead of the training ones; no gradients, no parameter updates.

    The "BN-adapt" baseline of TENT (Wang et al. 2021) and of Schneider et al. (2020), Nado et al. (2020).

    Args:
        norm: ``"batch"`` (the current batch's statistics), ``"mix"`` (``alpha * source + (1 - alpha) * batch``;
            Schneider et al.'s prior strength ``N`` gives ``alpha = N / (N + batch_size)``) or ``"ema"``
            (running statistics updated with ``momentum`` and carried over). Default ``"batch"``.
        alpha: source weight for ``mix``. Default ``0.5``.
        momentum: batch weight for ``ema``. Default ``0.1``.
        **options: further :class:`~ttc_lightning.TestTimeTraining` arguments (``keep_adapted``, ``stages``,
            ``reset``, ``save_every_n_batches``, ``resume_from``, ...); the gradient options (``steps``,
            ``scheduler``, ``clip_grad``, ...) are refused, as nothing is trained.

    Example::

        trainer = L.Trainer(callbacks=[ttc.BatchNormAdapt()])
    """

    fixed_options: ClassVar[tuple[str, ...]] = ("optimizer", "norm_alpha", "norm_momentum")

    def __init__(
        self,
        norm: str = "batch",
        alpha: float = 0.5,
        momentum: float = 0.1,
        **options: Any,
    ) -> None:
        self.check_options(options)
        check_range("alpha", alpha, 0, 1)
        check_range("momentum", momentum, 0, 1, low_open=True)
        super().__init__(
            optimizer=None,
            norm=norm,
            norm_alpha=alpha,
            norm_momentum=momentum,
            **options,
        )
