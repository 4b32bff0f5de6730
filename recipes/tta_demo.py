"""Test-time augmentation on scikit-learn's digits: error before and after, on clean and shifted/noisy test sets.

Trains a small CNN on 8x8 digits (deterministic, about ten seconds on 2 cores), augmenting each training batch
with a random view of the ``shift x multiscale`` policy (TTA helps most when the views are ones the model was trained
on), then predicts the held-out digits with ``trainer.predict`` and several ``TestTimeAugmentation``
policies, and prints a markdown table of error rates (%) and negative log-likelihood. The ``shift`` policy is a
transform registered with ``@ttc.register_transform``; ``hflip`` is there to show that a policy must suit the data
(digits are not mirror-symmetric).

Run: ``python recipes/tta_demo.py`` (after ``bash .ci/setup``).
"""

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


TRAIN_VIEWS = ttc.Augmenter(transforms=["shift", "multiscale"]).views


class DigitsCNN(ttc.TestTimeComputeMixin, L.LightningModule):
    """A small CNN that accepts any input size of at least 2x2 (adaptive pooling)."""

    def __init__(self) -> None:
        super().__init__()
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
        view = TRAIN_VIEWS[int(torch.randint(len(TRAIN_VIEWS), ()))]
        return F.cross_entropy(self(view.augment(x)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train/test split of the 1,797 digits as ``(N, 1, 8, 8)`` images in ``[0, 1]``."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target)
    idx_train, idx_test = train_test_split(range(len(labels)), test_size=0.4, random_state=0, stratify=labels)
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


def test_sets(images: Tensor) -> dict[str, Tensor]:
    """Clean, randomly 1-pixel-shifted, and Gaussian-noise (std 0.3) copies of the test images, seeded."""
    generator = torch.Generator().manual_seed(1)
    picks = torch.randint(1, len(SHIFTS), (len(images),), generator=generator)
    shifted = torch.stack([shift(img, *SHIFTS[int(k)]) for img, k in zip(images, picks, strict=True)])
    noisy = (images + 0.3 * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    return {"clean": images, "shifted": shifted, "noise": noisy}


def trainer(callbacks: list[L.Callback] | None = None, **kwargs: object) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=callbacks,
        deterministic=True,
        **kwargs,  # type: ignore[arg-type]
    )


POLICIES: dict[str, ttc.TestTimeAugmentation | None] = {
    "none": None,
    "shift (5 views)": ttc.TestTimeAugmentation(transforms="shift"),
    "multiscale (3)": ttc.TestTimeAugmentation(transforms="multiscale"),
    "shift x multiscale (15)": ttc.TestTimeAugmentation(transforms=["shift", "multiscale"]),
    "hflip (2)": ttc.TestTimeAugmentation(transforms="hflip"),
}


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    L.seed_everything(0, verbose=False)
    x_train, y_train, x_test, y_test = digits()
    model = DigitsCNN()
    train_loader = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True)
    print("Training a small CNN on digits (40 epochs)...")
    trainer(max_epochs=40, enable_progress_bar=False).fit(model, train_loader)

    rows = []
    for name, policy in POLICIES.items():
        cells = []
        for images in test_sets(x_test).values():
            loader = DataLoader(TensorDataset(images), batch_size=256)
            logits = torch.cat(trainer([policy] if policy else [], enable_progress_bar=False).predict(model, loader))
            error = (logits.argmax(1) != y_test).float().mean().item() * 100
            nll = F.cross_entropy(logits, y_test).item()
            cells.append(f"{error:.1f} / {nll:.3f}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\nTest-time augmentation on digits (error % / NLL; lower is better)\n")
    print("| policy | " + " | ".join(test_sets(x_test[:1])) + " |")
    print("|---|" + "---|" * 3)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
