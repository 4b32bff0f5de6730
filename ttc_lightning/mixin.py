"""``TestTimeComputeMixin``: a ``predict_step`` that runs the composed strategies around ``forward``."""

from collections.abc import Mapping
from typing import Any

from torch import Tensor
from typing_extensions import override

from ttc_lightning import pipeline


class TestTimeComputeMixin:
    """Gives a LightningModule a ``predict_step`` that feeds its input to ``self(...)``.

    Put it before ``LightningModule`` in the bases. The step extracts the forward's arguments from the batch with
    :meth:`ttc_inputs`, calls ``self(*args, **kwargs)`` (which the test-time callbacks have wrapped), and returns
    :meth:`ttc_outputs`: the model's own output (same type, shape and dtype), or a dict
    ``{"prediction": output, **extras}`` when a strategy was asked for extras such as uncertainty.

    Attributes:
        ttc_input_key: the key of the input in a mapping batch. Default ``"input"``.

    Example::

        class LitClassifier(ttc.TestTimeComputeMixin, L.LightningModule):
            def forward(self, x):
                return self.net(x)

        trainer = L.Trainer(callbacks=[ttc.TestTimeAugmentation(transforms="d4")])
        predictions = trainer.predict(LitClassifier(), dataloaders=loader)
    """

    __test__ = False  # not a pytest test class despite the name
    ttc_input_key: str = "input"

    def ttc_inputs(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Positional and keyword arguments of ``forward`` for ``batch``: the batch itself if it is a tensor, its
        first element if it is a tuple or list, ``batch[self.ttc_input_key]`` if it is a mapping. Override to pass
        more arguments; batch-first tensor arguments follow the input when views are stacked."""
        if isinstance(batch, Tensor):
            return (batch,), {}
        if isinstance(batch, list | tuple) and batch:
            return (batch[0],), {}
        if isinstance(batch, Mapping):
            if self.ttc_input_key not in batch:
                raise KeyError(
                    f"The batch has no key `ttc_input_key`={self.ttc_input_key!r}; its keys are {list(batch)}. Set "
                    "`ttc_input_key` on the module or override `ttc_inputs`."
                )
            return (batch[self.ttc_input_key],), {}
        raise TypeError(
            f"Cannot find the input in a batch of type {type(batch).__name__}: expected a tensor, a non-empty tuple "
            "or list, or a mapping. Override `ttc_inputs`."
        )

    def ttc_outputs(self, output: Any, extras: dict[str, Tensor]) -> Any:
        """The step's return value: ``output`` alone, or ``{"prediction": output, **extras}`` when extras exist."""
        return {"prediction": output, **extras} if extras else output

    @property
    def ttc_extras(self) -> dict[str, Tensor]:
        """Extras (uncertainty, ...) of the latest ``self(x)`` call (a copy); empty without requested extras."""
        return pipeline.current_extras(self)  # type: ignore[arg-type]

    @override  # LightningModule.predict_step, which follows this mixin in the bases
    def predict_step(self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> Any:
        inputs = self.ttc_inputs(batch)
        valid = isinstance(inputs, tuple) and len(inputs) == 2
        if not (valid and isinstance(inputs[0], tuple | list) and isinstance(inputs[1], Mapping)):
            raise TypeError(
                f"{type(self).__name__}.ttc_inputs must return (args, kwargs), a tuple of the positional arguments "
                f"and a dict of keyword arguments of forward, e.g. ((x,), {{}}); it returned {_describe(inputs)}."
            )
        args, kwargs = inputs
        output = pipeline.call(self, *args, **kwargs)  # type: ignore[arg-type]
        return self.ttc_outputs(output.value, output.extras)


def _describe(value: Any) -> str:
    """The type of ``value``, and of its items for a tuple."""
    if isinstance(value, tuple):
        return f"a tuple of {', '.join(type(v).__name__ for v in value)}"
    return type(value).__name__
