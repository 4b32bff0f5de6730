"""Output correction: what test-time training does to a batch's prediction after adapting on it.

The default, :class:`OutputCorrection`, returns the prediction unchanged. A correction that learns from the stream
(ROID's prior correction of the class probabilities, say) overrides :meth:`OutputCorrection.__call__`, resets with
the model, and saves its state with the adaptation state.
"""

from typing import Any


class OutputCorrection:
    """The identity correction: the prediction unchanged (subclasses correct it)."""

    def __call__(self, prediction: Any) -> Any:
        """The corrected ``prediction`` of a batch."""
        return prediction

    def reset(self) -> None:
        """Forget what was learnt from the stream (on every reset and at the start of a stage)."""

    def state(self) -> dict[str, Any]:
        """What to save with the adaptation state."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state`."""
