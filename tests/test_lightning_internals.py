"""Lightning's private attributes (``ttc_lightning.lightning_internals``): the Lightning version they were checked
against, that they still exist there, and that they do what the package relies on."""

import re

import lightning
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop
from lightning.pytorch.loops.prediction_loop import _PredictionLoop
from lightning.pytorch.overrides import distributed
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

import ttc_lightning.lightning_internals as internals


def release(version: str) -> tuple[int, ...]:
    """``"2.6.6"`` -> ``(2, 6, 6)``; a suffix such as ``rc1`` or ``.dev0`` ends the number."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    assert match is not None, version
    return tuple(int(number) for number in match.group().split("."))


def test_lightning_is_a_version_the_internals_were_checked_against():
    low, high = internals.CHECKED_VERSIONS
    assert release(low) <= release(lightning.__version__) < release(high), (
        f"lightning {lightning.__version__} is outside {low} <= version < {high}, the range whose private attributes "
        "ttc_lightning/lightning_internals.py was checked against: read each function there against the new "
        "version's source, run the tests, then widen CHECKED_VERSIONS."
    )


def test_release_parses_suffixes():
    assert release("2.6.6") == (2, 6, 6)
    assert release("2.7.0rc1") == (2, 7, 0)
    assert release("2.10.0.dev0") == (2, 10, 0)
    assert release("2.6.0") < release("2.6.6") < release("2.7.0") <= release("2.7.0rc1")


def test_the_private_names_still_exist():
    assert isinstance(distributed._IndexBatchSamplerWrapper, type)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False)
    for stage, name in internals.LOOPS.items():
        loop = getattr(trainer, name)
        assert isinstance(loop, _PredictionLoop if stage == "predict" else _EvaluationLoop), stage
        assert loop.inference_mode is True, stage
    bar = TQDMProgressBar()
    for name in internals.BARS.values():
        assert hasattr(bar, name) and getattr(bar, name) is None


@pytest.mark.parametrize("inference", [True, False])
def test_inference_mode_reads_and_sets_each_stage_loop(inference):
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, inference_mode=inference)
    for stage, name in internals.LOOPS.items():
        assert internals.inference_mode(trainer, stage) is inference
        internals.set_inference_mode(trainer, stage, not inference)
        assert getattr(trainer, name).inference_mode is (not inference)
        assert internals.inference_mode(trainer, stage) is (not inference)
    assert trainer.fit_loop.epoch_loop.val_loop.inference_mode is False  # fit's validation loop: its own, untouched
    with pytest.raises(ValueError, match=r"`stage`='fit' is not supported; allowed: 'predict', 'test', 'validate'"):
        internals.inference_mode(trainer, "fit")
    with pytest.raises(ValueError, match=r"`stage`='train' is not supported"):
        internals.set_inference_mode(trainer, "train", False)


class _Probe(BasePredictionWriter):
    def __init__(self) -> None:
        super().__init__("batch")
        self.records: list[bool] = []
        self.bars: list[bool] = []

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.records = [internals.records_batch_indices(loader) for loader in trainer.predict_dataloaders]

    @override
    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        bar = internals.progress_bar(trainer.progress_bar_callback, "predict")
        self.bars.append(bar is not None and bar is trainer.progress_bar_callback.predict_progress_bar)

    @override
    def write_on_batch_end(self, *args) -> None:
        pass


class _Stream(IterableDataset):
    @override
    def __iter__(self):
        return iter(torch.zeros(4, 2))


class _Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    @override
    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self.layer(batch)


def test_batch_indices_and_progress_bar_during_a_predict_run():
    probe, model = _Probe(), _Net()
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, callbacks=[probe], accelerator="cpu")
    trainer.predict(model, [DataLoader(torch.zeros(4, 2), batch_size=2), DataLoader(_Stream(), batch_size=2)])
    assert probe.records == [True, False]  # an iterable dataset carries no dataset indices
    assert probe.bars == [True] * 4
    assert internals.progress_bar(TQDMProgressBar(), "test") is None
    with pytest.raises(ValueError, match=r"`stage`='fit' is not supported"):
        internals.progress_bar(TQDMProgressBar(), "fit")
