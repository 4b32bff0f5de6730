"""scikit-learn's digits and a small CNN for them: the offline data and model of the recipes and tests."""

import logging
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import ttc_lightning as ttc
from ttc_lightning.tta.views import View

SHIFTS = ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0))


def shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """Translate the last two dimensions by ``(dy, dx)`` pixels, filling with zeros."""
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    return padded[..., 1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]


@ttc.register_transform("shift")
class Shift(ttc.Transform):
    """One-pixel translations (identity first); no inverse, so classification only."""

    def __init__(self, shifts: tuple[tuple[int, int], ...] = SHIFTS) -> None:
        super().__init__(shifts)

    def augment(self, x: Tensor, param: tuple[int, int]) -> Tensor:
        return shift(x, *param) if param != (0, 0) else x


#: The views the recipes train on: one-pixel shifts x scales 1, 0.875, 1.125 (15, identity first).
TRAIN_VIEWS = ttc.Augmenter(transforms=["shift", "multiscale"]).views


def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A stratified 60/40 train/test split of the 1,797 digits as ``(N, 1, 8, 8)`` images in ``[0, 1]``."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    idx_train, idx_test = train_test_split(range(len(labels)), test_size=0.4, random_state=0, stratify=labels)
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


class DigitsCNN(ttc.TestTimeComputeMixin, L.LightningModule):
    """Two conv + BatchNorm blocks, adaptive pooling (any input of at least 2x2), a linear head.

    Args:
        train_views: if given, each training batch is seen through one of these views, drawn at random.
    """

    def __init__(self, train_views: list[View] | None = None) -> None:
        super().__init__()
        self.train_views = train_views or []
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(128, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.train_views:
            x = self.train_views[int(torch.randint(len(self.train_views), ()))].augment(x)
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def quiet() -> None:
    """Silence Lightning's info messages and warnings (recipes print their own tables)."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")


def trainer(callbacks: list[L.Callback] | None = None, **kwargs: object) -> L.Trainer:
    """A deterministic single-CPU Trainer without logger, checkpoints or progress bar (unless asked)."""
    options: dict[str, object] = {"enable_progress_bar": False, **kwargs}
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=callbacks,
        deterministic=True,
        **options,  # type: ignore[arg-type]
    )


def fit(
    model: DigitsCNN, data: tuple[Tensor, Tensor], epochs: int, batch_size: int = 64, progress_bar: bool = False
) -> L.Trainer:
    """Train ``model`` deterministically on ``data`` (images, labels), shuffled; clear its ``train_views`` after.
    Returns the Trainer (to save a checkpoint)."""
    run = trainer(max_epochs=epochs, enable_progress_bar=progress_bar)
    run.fit(model, DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=True))
    model.train_views = []
    return run


def train(
    epochs: int, train_views: list[View] | None = None, seed: int = 0, data: tuple[Tensor, Tensor] | None = None
) -> DigitsCNN:
    """A DigitsCNN trained deterministically (Adam, batch 64) on ``data`` (images, labels), by default the digits
    training split."""
    L.seed_everything(seed, verbose=False)
    model = DigitsCNN(train_views)
    fit(model, data if data is not None else digits()[:2], epochs)
    return model.eval()


def predict(model: L.LightningModule, images: Tensor, callbacks: list[L.Callback], batch_size: int = 64) -> Tensor:
    """Logits of ``trainer.predict`` with ``callbacks`` over ``images``."""
    loader = DataLoader(TensorDataset(images), batch_size=batch_size)
    return torch.cat(trainer(callbacks).predict(model, loader))  # type: ignore[arg-type]
