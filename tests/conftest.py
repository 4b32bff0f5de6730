"""Shared small fixtures: tiny conv classifiers (with and without the mixin), image batches, loaders, Trainers."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from ttt_models import trainer

import ttc_lightning as ttc

N, C, H, W, CLASSES, BATCH = 24, 3, 12, 10, 5, 8

# Tests use tiny tensors: one intra-op thread is fastest and keeps run times steady on a loaded 2-core machine.
torch.set_num_threads(1)


def tiny_net(norm: bool = False) -> nn.Sequential:
    """A conv classifier; batch-independent unless ``norm`` adds BatchNorm/Dropout and it is in train mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        extra = [nn.BatchNorm2d(6), nn.Dropout(0.5)] if norm else []
        return nn.Sequential(
            nn.Conv2d(C, 6, 3, padding=1),
            *extra,
            nn.ReLU(),
            nn.AdaptiveAvgPool2d((2, 2)),
            nn.Flatten(),
            nn.Linear(24, CLASSES),
        )


class StepRecorder:
    """Steps that record, per stage, each output of ``self(x)`` and whether ``forward`` was wrapped."""

    def _record(self, stage: str, batch) -> torch.Tensor:
        x, y = batch
        wrapped = "forward" in self.__dict__
        out = self(x)
        self.records.setdefault(stage, []).append((out.detach().clone(), wrapped))
        return nn.functional.cross_entropy(out.float(), y)

    def training_step(self, batch, batch_idx):
        self.records.setdefault("train_wrapped", []).append("forward" in self.__dict__)
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._record("validate", batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._record("test", batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PlainClassifier(StepRecorder, L.LightningModule):
    """Conv classifier without the mixin: its ``predict_step`` calls ``self(x)``; counts forward calls."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.net = tiny_net(norm)
        self.calls = 0
        self.records: dict[str, list] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


class TinyClassifier(ttc.TestTimeComputeMixin, PlainClassifier):
    """The same classifier with the mixin's ``predict_step``."""


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(N, C, H, W, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def labels() -> torch.Tensor:
    return torch.randint(0, CLASSES, (N,), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def loader(images, labels) -> DataLoader:
    """(x, y) batches of 8 images 3x12x10, three batches."""
    return DataLoader(TensorDataset(images, labels), batch_size=BATCH)


@pytest.fixture
def model() -> TinyClassifier:
    return TinyClassifier()


@pytest.fixture
def plain_model() -> PlainClassifier:
    return PlainClassifier()


@pytest.fixture
def classifier_cls() -> type[TinyClassifier]:
    return TinyClassifier


@pytest.fixture
def plain_cls() -> type[PlainClassifier]:
    return PlainClassifier


@pytest.fixture
def make_trainer(tmp_path):
    """A quiet CPU Trainer factory: ``make_trainer(callbacks, **trainer_kwargs)``."""

    def make(callbacks=(), **kwargs) -> L.Trainer:
        return trainer(callbacks, **{"default_root_dir": tmp_path, **kwargs})

    return make


def hflip_mean(forward, x: torch.Tensor) -> torch.Tensor:
    """The reference for ``transforms="hflip", merge="mean"`` on a classifier: mean of identity and h-flip views."""
    with torch.no_grad():
        return (forward(x) + forward(x.flip(-1))) / 2


@pytest.fixture
def reference():
    """``reference(forward, x)``: the hflip-mean prediction written out."""
    return hflip_mean
