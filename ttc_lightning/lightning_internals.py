"""Every private Lightning attribute ttc-lightning relies on, in one module.

Lightning gives no public way to do what these functions do: switch a stage's loop out of inference mode for
gradient strategies, know whether a predict dataloader records the dataset indices of its batches, and reach the
TQDM bar of a stage. They were checked against :data:`CHECKED_VERSIONS`; ``tests/test_lightning_internals.py`` fails
on any other Lightning version, so that an upgrade is a deliberate step that looks at each of them again.
"""

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.overrides.distributed import _IndexBatchSamplerWrapper

#: The Lightning versions (``>=`` first, ``<`` second) whose private attributes below were read and tested.
CHECKED_VERSIONS: tuple[str, str] = ("2.6.0", "2.7.0")
#: The Trainer's loop of each stage a test-time strategy runs in (``Trainer.predict_loop``, ...).
LOOPS: dict[str, str] = {"predict": "predict_loop", "test": "test_loop", "validate": "validate_loop"}
#: ``TQDMProgressBar``'s private attribute holding each stage's bar (its public properties raise while unset).
BARS: dict[str, str] = {
    "predict": "_predict_progress_bar",
    "test": "_test_progress_bar",
    "validate": "_val_progress_bar",
}


def _loop(trainer: pl.Trainer, stage: str) -> Any:
    if stage not in LOOPS:
        raise ValueError(f"`stage`={stage!r} is not supported; allowed: {', '.join(map(repr, LOOPS))}.")
    return getattr(trainer, LOOPS[stage])


def inference_mode(trainer: pl.Trainer, stage: str) -> bool:
    """Whether ``trainer`` runs ``stage`` (``"predict"``, ``"test"`` or ``"validate"``) under
    ``torch.inference_mode`` (the loop's ``inference_mode`` flag, set from ``Trainer(inference_mode=...)``).

    Raises:
        ValueError: ``stage`` is none of those.
    """
    return bool(_loop(trainer, stage).inference_mode)


def set_inference_mode(trainer: pl.Trainer, stage: str, value: bool) -> None:
    """Make ``trainer`` run ``stage`` under ``torch.inference_mode`` or not (before the loop starts; restore the value
    of :func:`inference_mode` afterwards).

    Raises:
        ValueError: ``stage`` is none of ``"predict"``, ``"test"``, ``"validate"``.
    """
    _loop(trainer, stage).inference_mode = value


def records_batch_indices(loader: object) -> bool:
    """Whether Lightning records the dataset indices of each batch of the predict dataloader ``loader`` (it wraps the
    batch sampler for prediction writers; not for iterable datasets or loaders without a batch size)."""
    return isinstance(getattr(loader, "batch_sampler", None), _IndexBatchSamplerWrapper)


def progress_bar(callback: TQDMProgressBar, stage: str) -> Any:
    """The tqdm bar of ``stage`` in ``callback``, or ``None`` while it has none.

    Raises:
        ValueError: ``stage`` is none of ``"predict"``, ``"test"``, ``"validate"``.
    """
    if stage not in BARS:
        raise ValueError(f"`stage`={stage!r} is not supported; allowed: {', '.join(map(repr, BARS))}.")
    return getattr(callback, BARS[stage], None)
