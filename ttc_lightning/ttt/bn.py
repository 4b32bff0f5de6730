"""``BatchNormAdapt``: statistics-only test-time adaptation of BatchNorm layers."""

from collections.abc import Sequence

from ttc_lightning.ttt.base import TestTimeTraining
from ttc_lightning.ttt.norm import NormStatistics
from ttc_lightning.ttt.persistence import Persistence
from ttc_lightning.ttt.refusals import refuse_moved
from ttc_lightning.ttt.resets import Resets


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
        resets: with ``norm="ema"`` (whose running statistics carry over), ``every="batch"`` or ``"dataloader"``
            (:class:`~ttc_lightning.Resets`; its other options need gradient steps and are refused).
        persistence: with ``norm="ema"``, keep, save and resume the running statistics
            (:class:`~ttc_lightning.Persistence`; refused with another ``norm``, which stores nothing).
        stages: Trainer stages to act in. Default ``("predict",)``.

    Raises:
        ValueError: for a bad value or an argument that cannot act given the others (by name, with why and a remedy).

    Example::

        trainer = L.Trainer(callbacks=[ttc.BatchNormAdapt()])
    """

    @refuse_moved
    def __init__(
        self,
        norm: str = "batch",
        alpha: float = 0.5,
        momentum: float = 0.1,
        resets: Resets = Resets(),  # noqa: B008 (frozen)
        persistence: Persistence = Persistence(),  # noqa: B008 (frozen)
        stages: Sequence[str] = ("predict",),
    ) -> None:
        statistics = NormStatistics(norm, alpha, momentum)
        super().__init__(optimizer=None, norm=statistics, resets=resets, persistence=persistence, stages=stages)
        self.norm_arguments = statistics.given()
