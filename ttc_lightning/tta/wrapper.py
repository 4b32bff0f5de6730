"""``TTAWrapper``: test-time augmentation around a plain ``nn.Module``, without Lightning."""

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from typing_extensions import override

from ttc_lightning.pipeline import uses_batch_statistics
from ttc_lightning.stopping import StoppingRule
from ttc_lightning.tta.augmenter import Augmenter
from ttc_lightning.tta.tasks import TaskSpec, refuse_moved
from ttc_lightning.tta.transforms import TransformSpec


class TTAWrapper(nn.Module):
    """Wraps a model so that its forward merges the de-augmented outputs of augmented views (ttach-style).

    Shares its core (:class:`~ttc_lightning.Augmenter`) with :class:`~ttc_lightning.TestTimeAugmentation`, so both
    give the same numbers.

    Args:
        model: the module to wrap; called as ``model(x, *args, **kwargs)`` on stacked views.
        transforms, merge, task, space, activation, uncertainty, chunk_size, stop, min_views, anytime,
            return_views: as for :class:`~ttc_lightning.Augmenter`, with the same defaults.

    Returns from ``forward``: the merged output, or ``{"prediction": output, **extras}`` when ``uncertainty`` (or
    ``return_views``) asks for extras.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``, and for what :class:`~ttc_lightning.Augmenter` refuses.
        ValueError: for what :class:`~ttc_lightning.Augmenter` refuses.

    Example::

        tta_model = ttc.TTAWrapper(model, transforms="d4", merge="mean")
        logits = tta_model(images)
    """

    @refuse_moved
    def __init__(
        self,
        model: nn.Module,
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
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be the nn.Module to wrap; got {type(model).__name__}.")
        self.model = model
        self.augmenter = Augmenter(
            transforms, merge, task, space, activation, uncertainty, chunk_size, stop, min_views, anytime, return_views
        )

    @override
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor | dict[str, Tensor]:
        batch_dependent = uses_batch_statistics(self.model)  # then chunk_size="auto" is the same on every device
        output, extras = self.augmenter.apply(self.model, x, args, kwargs, batch_dependent=batch_dependent)
        return {"prediction": output, **extras} if extras else output
