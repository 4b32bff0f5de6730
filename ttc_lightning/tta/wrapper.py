"""``TTAWrapper``: test-time augmentation around a plain ``nn.Module``, without Lightning."""

from typing import Any

from torch import Tensor, nn

from ttc_lightning.pipeline import uses_batch_statistics
from ttc_lightning.tta.augmenter import Augmenter


class TTAWrapper(nn.Module):
    """Wraps a model so that its forward merges the de-augmented outputs of augmented views (ttach-style).

    Shares its core (:class:`~ttc_lightning.tta.augmenter.Augmenter`) with
    :class:`~ttc_lightning.TestTimeAugmentation`, so both give the same numbers.

    Args:
        model: the module to wrap; called as ``model(x, *args, **kwargs)`` on stacked views.
        **options: the :class:`~ttc_lightning.tta.augmenter.Augmenter` arguments (``transforms``, ``merge``,
            ``task``, ``space``, ``activation``, ``flip_classes``, ``flip_pairs``, ``uncertainty``, ``chunk_size``).

    Returns from ``forward``: the merged output, or ``{"prediction": output, **uncertainty}`` when ``uncertainty`` is
    requested.

    Example::

        tta_model = ttc.TTAWrapper(model, transforms="d4", merge="mean")
        logits = tta_model(images)
    """

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be the nn.Module to wrap; got {type(model).__name__}.")
        self.model = model
        self.augmenter = Augmenter(**options)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor | dict[str, Tensor]:
        batch_dependent = uses_batch_statistics(self.model)  # then chunk_size="auto" is the same on every device
        output, extras = self.augmenter.apply(self.model, x, args, kwargs, batch_dependent=batch_dependent)
        return {"prediction": output, **extras} if extras else output
