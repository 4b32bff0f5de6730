"""``BatchNormAdapt``: statistics-only test-time adaptation of BatchNorm layers."""

from typing import Any, ClassVar

from ttc_lightning.checks import check_range, check_unused
from ttc_lightning.ttt.base import TestTimeTraining


class BatchNormAdapt(TestTimeTraining):
    """Normalises with test-batch statistics instead of the training ones; no gradients, no parameter updates.

    The "BN-adapt" baseline of TENT (Wang et al. 2021) and of Schneider et al. (2020), Nado et al. (2020).

    Args:
        norm: ``"batch"`` (the current batch's statistics), ``"mix"`` (``alpha * source + (1 - alpha) * batch``;
            Schneider et al.'s prior strength ``N`` gives ``alpha = N / (N + batch_size)``) or ``"ema"``
            (running statistics updated with ``momentum`` and carried over); ``"source"`` would change nothing and
            is refused. Default ``"batch"``.
        alpha: source weight for ``mix`` (refused with another ``norm``). Default ``0.5``.
        momentum: batch weight for ``ema`` (refused with another ``norm``). Default ``0.1``.
        **options: the :class:`~ttc_lightning.TestTimeTraining` arguments that act without gradient steps:
            ``stages``, and with ``norm="ema"`` (whose running statistics carry over) ``keep_adapted``, ``reset``
            (``"batch"`` or ``"dataloader"``), ``save_every_n_batches``, ``save_path`` and ``resume_from``. The
            gradient options (``objective``, ``params``, ``steps``, ``scheduler``, ``clip_grad``, ``clip_mode``,
            ``tol``, ``reset_on_collapse``, ``reset_on_nonfinite``, ``sync``, ``flags``) are refused, as nothing is
            trained (:attr:`unused_options` says why for each).

    Example::

        trainer = L.Trainer(callbacks=[ttc.BatchNormAdapt()])
    """

    fixed_options: ClassVar[tuple[str, ...]] = ("optimizer", "norm_alpha", "norm_momentum")
    unused_options: ClassVar[dict[str, str]] = {
        "objective": "nothing is trained, so no objective is minimised",
        "params": "nothing is trained, so no parameter is adapted (only the BatchNorm statistics)",
        "steps": "nothing is trained, so there are no update steps",
        "scheduler": "nothing is trained, so there is no learning rate to schedule",
        "clip_grad": "nothing is trained, so there are no gradients to clip",
        "clip_mode": "nothing is trained, so there are no gradients to clip",
        "tol": "nothing is trained, so there are no steps to end early",
        "reset_on_collapse": "nothing is trained, so there is no loss whose collapse could be watched",
        "reset_on_nonfinite": "nothing is trained, so there is no loss or gradient that could be non-finite",
        "sync": "nothing is trained, so there are no gradients or decisions to synchronise (each process normalises "
        "with its own statistics)",
        "flags": "the flags describe gradient steps (samples kept in the loss, skipped updates), and it takes none",
    }

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
        if norm != "mix":
            why = f"it weighs the source statistics of norm='mix', and norm={norm!r}"
            check_unused("alpha", alpha, 0.5, why, "Set norm='mix' or drop it")
        if norm != "ema":
            why = f"it weighs each batch in the running statistics of norm='ema', and norm={norm!r}"
            check_unused("momentum", momentum, 0.1, why, "Set norm='ema' or drop it")
        super().__init__(
            optimizer=None,
            norm=norm,
            norm_alpha=alpha,
            norm_momentum=momentum,
            **options,
        )
