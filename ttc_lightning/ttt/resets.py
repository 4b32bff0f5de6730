"""When test-time training returns to the source model: every batch, every dataloader, every N updates, on a
collapse of the loss, after a non-finite update.

:class:`Resets` groups the options (``resets=Resets(...)``); :class:`ResetPolicy` decides, batch by batch, whether
a reset is due.
"""

from dataclasses import dataclass, fields, replace
from typing import Any

from ttc_lightning.checks import check_bool, check_choice, check_int, check_unused, is_default
from ttc_lightning.ttt.updater import check_threshold

RESETS = ("never", "batch", "dataloader")
#: Smoothing of the loss average that collapse detection watches (SAR's 0.9).
COLLAPSE_SMOOTHING = 0.9


@dataclass(frozen=True)
class Resets:
    """When to restore the source model and start a fresh optimizer (the ``resets`` option).

    Args:
        every: ``"never"`` (continual within the stage), ``"batch"`` (episodic: what a preset's ``episodic=True``
            sets), ``"dataloader"`` (at each new dataloader of the stage; refused at the start of a stage with one
            dataloader), or an int ``N`` (every ``N`` updates; needs an ``optimizer``). Without an ``optimizer`` only
            ``norm="ema"`` has state to reset. Default ``"never"``.
        on_collapse: reset when the running average (smoothing 0.9) of the loss falls below this value (collapse of
            the predictions to one class drives the entropy to zero; SAR uses 0.2); refused with ``every="batch"`` or
            ``1``, which reset anyway. Default ``None``.
        on_nonfinite: also reset before the next batch after a non-finite loss or gradient (the update itself is
            always skipped); refused with ``every="batch"``. Default ``False``.

    Raises:
        ValueError: for a bad value, or an option that the others leave without effect.
    """

    every: str | int = "never"
    on_collapse: float | None = None
    on_nonfinite: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.every, str):
            check_choice("resets.every", self.every, RESETS)
        else:
            check_int("resets.every", self.every, 1)
        check_threshold("resets.on_collapse", self.on_collapse)
        check_bool("resets.on_nonfinite", self.on_nonfinite)
        every = self.every
        if every == "batch" or every == 1:
            when = "before every batch" if every == "batch" else "after every update"
            kind = " (episodic)" if every == "batch" else ""
            why = f"resets.every={every!r}{kind} already resets {when}, which a collapse reset cannot add to"
            remedy = "Use every='never' (episodic=False in a preset) or an N > 1 to let the loss average build up"
            check_unused("resets.on_collapse", self.on_collapse, None, why, remedy)
        if every == "batch":
            why = "resets.every='batch' (episodic) already resets before every batch, non-finite ones included"
            remedy = "Use another `every` (episodic=False in a preset) or drop it"
            check_unused("resets.on_nonfinite", self.on_nonfinite, False, why, remedy)

    def given(self) -> list[str]:
        """The options set to other values than their defaults, as ``resets.<name>``."""
        return [f"resets.{f.name}" for f in fields(self) if not is_default(getattr(self, f.name), f.default)]


def episodic_resets(episodic: bool, resets: Resets) -> Resets:
    """``resets`` with ``every="batch"`` when a preset's ``episodic`` is true.

    Raises:
        ValueError: for a non-bool ``episodic``, or with ``episodic=True`` a ``resets.every`` other than the default
            (episodic already says when to reset), or options that every-batch resets leave without effect.
    """
    if not check_bool("episodic", episodic):
        return resets
    why = "episodic=True already resets before every batch"
    check_unused("resets.every", resets.every, "never", why, "Use episodic=False or drop it")
    return replace(resets, every="batch")


class ResetPolicy:
    """Decides before each batch whether a reset is due, from the batches and updates since the last reset, the
    dataloader, the loss average and non-finite updates.

    Args:
        resets: the reset options.
    """

    def __init__(self, resets: Resets) -> None:
        self.options = resets
        self.count = 0
        self.last_dataloader: int | None = None
        self.restart()

    def restart(self) -> None:
        """Forget what happened since the last reset (at a reset, and at the start of a stage)."""
        self.updates_since = self.batches_since = 0
        self.loss_average: float | None = None
        self.diverged = False

    def clear(self) -> None:
        """The start of a stage: no reset yet, no dataloader seen."""
        self.count = 0
        self.last_dataloader = None
        self.restart()

    def due(self, dataloader_idx: int) -> bool:
        """Whether a reset is due before the batch of ``dataloader_idx`` (called once per batch)."""
        every, collapse = self.options.every, self.options.on_collapse
        new_loader = self.last_dataloader is not None and dataloader_idx != self.last_dataloader
        self.last_dataloader = dataloader_idx
        return (
            (every == "batch" and self.batches_since > 0)
            or (every == "dataloader" and new_loader)
            or (isinstance(every, int) and self.updates_since >= every)
            or self.diverged
            or (collapse is not None and self.loss_average is not None and self.loss_average < collapse)
        )

    def updated(self, value: float) -> None:
        """Record an update that used the loss ``value``."""
        self.updates_since += 1
        average = self.loss_average
        self.loss_average = (
            value if average is None else COLLAPSE_SMOOTHING * average + (1 - COLLAPSE_SMOOTHING) * value
        )

    def nonfinite(self) -> None:
        """Record a skipped update (non-finite loss or gradients)."""
        self.diverged = self.options.on_nonfinite

    def state(self) -> dict[str, Any]:
        """The counters since the last reset, the loss average and the number of resets."""
        return {"since": (self.updates_since, self.batches_since, self.loss_average), "count": self.count}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state`."""
        self.updates_since, self.batches_since, self.loss_average = state["since"]
        self.count = state["count"]
