"""``TestTimeAugmentation``: test-time augmentation as a Lightning callback."""

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor
from typing_extensions import override

from ttc_lightning.callback import TestTimeCallback
from ttc_lightning.halting import HaltingStats
from ttc_lightning.pipeline import Inner, Output, Run, Step, values
from ttc_lightning.stopping import StoppingRule
from ttc_lightning.tta.augmenter import Augmenter
from ttc_lightning.tta.tasks import TaskSpec, refuse_moved
from ttc_lightning.tta.transforms import TransformSpec


class TestTimeAugmentation(TestTimeCallback):
    """Predicts each batch as the merge of the model's de-augmented outputs on augmented views.

    The innermost strategy of a pipeline: adaptation and iterative inference wrap it. With default settings the
    prediction has the type, shape and dtype of the model's own output; with ``uncertainty`` the
    ``TestTimeComputeMixin`` step returns ``{"prediction": ..., "std": ..., ...}``.

    Args:
        transforms: an alias (``hflip``; ``vflip``; ``flip`` = h-flip x v-flip; ``d4`` = h-flip x rot90
            0/90/180/270; ``multiscale`` = scales 1, 0.875, 1.125; ``five_crop`` = center and corner crops of 0.875
            of each side; ``ten_crop`` = h-flip x five_crop), a registered transform name (``identity``, ``hflip``,
            ``vflip``, ``rot90``, ``transpose``, ``scale``, ``add``, ``multiply``, ``five_crop`` or your own), a
            :class:`~ttc_lightning.Transform`, or a list of these, expanded into the product of their parameters
            (last fastest; identity first). Default ``"hflip"``.
        merge: ``mean``, ``sum``, ``max``, ``min``, ``median``, ``gmean``, ``tsharpen`` or ``vote``. Default
            ``"mean"``.
        task: ``classification``, ``segmentation``, ``keypoints`` or ``boxes`` with their defaults, or a task object
            with its options: ``ttc.tta.Classification(flip_classes=...)``, ``ttc.tta.Segmentation(flip_classes=...)``
            (class index pairs swapped in mirrored views), ``ttc.tta.Keypoints(flip_pairs=...)`` (keypoint index
            pairs), ``ttc.tta.Boxes()``. Default ``"classification"``.
        space: ``raw`` (ttach's numbers), ``prob`` or ``logprob``; ``None`` picks ``raw``, or ``prob`` for
            ``gmean``, ``tsharpen`` and ``vote``. Default ``None``.
        activation: ``softmax`` or ``sigmoid`` (multi-label), for ``space`` ``prob``/``logprob`` and the class
            uncertainty measures (refused where neither is used). Default ``"softmax"``.
        uncertainty: ``True`` or names among ``std``, ``entropy``, ``mutual_info``, ``agreement``. Default ``None``.
        chunk_size: views per forward; ``None`` stacks all views of a shape, ``"auto"`` is 1 on CPU (one view's
            memory; timings in ``benchmarks/README.md``) and ``None`` on accelerators (not measured: no GPU run
            exists), except that it is 1 on every device when the model's forward depends on the batch (batch
            statistics: adaptation with a ``norm`` other than ``"source"``, BatchNorm in train mode), so that the
            predictions do not depend on the device; refused with ``stop`` or a single view. Default ``"auto"``.
        stop: a :mod:`~ttc_lightning.stopping` rule: views run in order (identity first) on the samples still
            running, and a sample stops once the rule holds on the running mean probability of its views; halted
            samples leave the forward batch. Default ``None`` (every sample gets every view).
        min_views: views every sample gets before ``stop`` is asked (needs ``stop``; fewer than the views unless
            ``anytime``). Default ``1``.
        anytime: with ``stop``, return each sample's merge at its best-scoring view count. Default ``False``.
        return_views: with ``stop``, add each sample's number of views as the extra ``views``. Default ``False``.
        stages: Trainer stages to act in, from ``predict``, ``test``, ``validate``. Default ``("predict",)``.

    With ``stop``, the figures ``iterations`` (mean views per sample), ``saved`` (forward samples saved vs every
    view) and ``halted/<rule>`` (fraction of samples each rule stopped; ``halted/max_iters``: samples that saw every
    view) appear in the progress bar and the logger, and are summarised at the end of the stage.

    Raises:
        ValueError: for the arguments :class:`~ttc_lightning.Augmenter` refuses (unknown names, contradictions,
            arguments that cannot act given the others) and unknown ``stages``.
        TypeError: for a ``stop`` that is not a stopping rule, and ``flip_classes``/``flip_pairs``, which moved to
            the task objects.

    Example::

        trainer = L.Trainer(callbacks=[ttc.TestTimeAugmentation(transforms="d4", merge="mean")])
        logits = trainer.predict(model, dataloaders=loader)

        adaptive = ttc.TestTimeAugmentation(transforms="d4", stop=stopping.Confidence(0.95) | stopping.Stable(2))
        pose = ttc.TestTimeAugmentation(transforms="hflip", task=ttc.tta.Keypoints(flip_pairs=[(1, 2), (3, 4)]))
    """

    role: ClassVar[str] = "augmentation"

    @refuse_moved
    def __init__(
        self,
        transforms: TransformSpec = "hflip",
        merge: str = "mean",
        task: TaskSpec = "classification",
        space: str | None = None,
        activation: str = "softmax",
        uncertainty: bool | str | Sequence[str] | None = None,
        chunk_size: int | str | None = "auto",
        stop: StoppingRule | None = None,
        min_views: int = 1,
        anytime: bool = False,
        return_views: bool = False,
        stages: Sequence[str] = ("predict",),
    ) -> None:
        super().__init__(stages=stages)
        self.augmenter = Augmenter(
            transforms,
            merge,
            task,
            space,
            activation,
            uncertainty,
            chunk_size,
            stop,
            min_views,
            anytime,
            return_views,
        )

    @override
    def figures(self) -> dict[str, float]:
        return self.augmenter.stats.figures()

    @override
    def start(self, run: Run) -> None:
        self.augmenter.stats = HaltingStats()

    @override
    def wrap(self, inner: Inner) -> Step:
        forward, batch_dependent = values(inner.forward), inner.batch_dependent

        def step(x: Tensor, *args: Any, **kwargs: Any) -> Output:
            return Output(*self.augmenter.apply(forward, x, args, kwargs, batch_dependent=batch_dependent))

        return step
