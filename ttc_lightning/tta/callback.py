"""``TestTimeAugmentation``: test-time augmentation as a Lightning callback."""

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor

from ttc_lightning.callback import TestTimeCallback
from ttc_lightning.pipeline import Context, Forward
from ttc_lightning.tta.augmenter import Augmenter
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
        task: ``classification``, ``segmentation``, ``keypoints`` or ``boxes``. Default ``"classification"``.
        space: ``raw`` (ttach's numbers), ``prob`` or ``logprob``; ``None`` picks ``raw``, or ``prob`` for
            ``gmean``, ``tsharpen`` and ``vote``. Default ``None``.
        activation: ``softmax`` or ``sigmoid`` (multi-label). Default ``"softmax"``.
        flip_classes: class index pairs swapped in mirrored views. Default ``None``.
        flip_pairs: keypoint index pairs swapped in mirrored views. Default ``None``.
        uncertainty: ``True`` or names among ``std``, ``entropy``, ``mutual_info``, ``agreement``. Default ``None``.
        chunk_size: views per forward; ``None`` stacks all views of a shape, ``"auto"`` is 1 on CPU and ``None`` on
            accelerators. Default ``"auto"``.
        stages: Trainer stages to act in, from ``predict``, ``test``, ``validate``. Default ``("predict",)``.

    Example::

        trainer = L.Trainer(callbacks=[ttc.TestTimeAugmentation(transforms="d4", merge="mean")])
        logits = trainer.predict(model, dataloaders=loader)
    """

    role: ClassVar[str] = "augmentation"

    def __init__(
        self,
        transforms: TransformSpec = "hflip",
        merge: str = "mean",
        task: str = "classification",
        space: str | None = None,
        activation: str = "softmax",
        flip_classes: Sequence[Sequence[int]] | None = None,
        flip_pairs: Sequence[Sequence[int]] | None = None,
        uncertainty: bool | str | Sequence[str] | None = None,
        chunk_size: int | str | None = "auto",
        stages: Sequence[str] = ("predict",),
    ) -> None:
        super().__init__(stages=stages)
        self.augmenter = Augmenter(
            transforms, merge, task, space, activation, flip_classes, flip_pairs, uncertainty, chunk_size
        )

    def wrap(self, inner: Forward, context: Context) -> Forward:
        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            output, extras = self.augmenter(inner, x, *args, **kwargs)
            context.extras.update(extras)
            return output

        return forward
