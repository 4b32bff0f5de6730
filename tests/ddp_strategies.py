"""TTA, iterative inference and episodic adaptation on 2 CPU processes (DDP over gloo), predictions written by
ttc.PredictionWriter; run by tests/test_distributed.py, which compares them with single-process references.

Usage: python ddp_strategies.py OUT_DIR  (writes OUT_DIR/<config>.pt)
"""

import functools
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ttc_lightning as ttc
from ttc_lightning import stopping

SAMPLES, BATCH = 23, 4  # rank 0: samples 0, 2, ..., 22 (12 = 3 batches); rank 1: 1, 3, ..., 21 (11 = 3 batches)


def inputs() -> torch.Tensor:
    return torch.randn(SAMPLES, 3, 8, 8, generator=torch.Generator().manual_seed(2))


class ConvNet(ttc.TestTimeComputeMixin, L.LightningModule):
    """conv, BatchNorm (non-trivial running statistics), ReLU, pool, linear: batch-independent in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Conv2d(3, 6, 3),
                nn.BatchNorm2d(6),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(2),
                nn.Flatten(),
                nn.Linear(24, 5),
            )
            self.net[1].running_mean.uniform_(-0.2, 0.2)
            self.net[1].running_var.uniform_(0.5, 1.5)
        with torch.no_grad():
            self.net[-1].weight.mul_(20)

    def forward(self, x):
        return self.net(x)


class FixedPoint(ttc.TestTimeComputeMixin, L.LightningModule):
    """``h <- tanh(W h + U x)``; output ``head(h)``."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.U, self.W, self.head = nn.Linear(192, 16), nn.Linear(16, 16, bias=False), nn.Linear(16, 5)
        with torch.no_grad():
            self.W.weight.mul_(0.6)

    def forward(self, x):
        return self.head(torch.tanh(self.U(x.flatten(1))))

    def ttc_init(self, x):
        return x.new_zeros(len(x), 16)

    def ttc_refine(self, x, h):
        h = torch.tanh(self.W(h) + self.U(x.flatten(1)))
        return self.head(h), h


class Dropper(ttc.TestTimeComputeMixin, L.LightningModule):
    """flatten, linear, ReLU, dropout, linear."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 5))

    def forward(self, x):
        return 3 * self.net(x)


SGD = functools.partial(torch.optim.SGD, lr=0.1)
#: name -> (model factory, callbacks factory)
CONFIGS: dict[str, tuple[Callable[[], L.LightningModule], Callable[[], list[L.Callback]]]] = {
    "tta": (ConvNet, lambda: [ttc.TestTimeAugmentation("d4", uncertainty=["entropy"])]),
    "tta_adaptive": (
        ConvNet,
        lambda: [ttc.TestTimeAugmentation("d4", stop=stopping.Confidence(0.8), return_views=True)],
    ),
    "refine": (
        FixedPoint,
        lambda: [ttc.IterativeInference("refine", stopping.Converged(1e-3), 30, return_iterations=True)],
    ),
    "sample": (Dropper, lambda: [ttc.IterativeInference("sample", stopping.BetaVote(0.9), 12, return_iterations=True)]),
    "tent_episodic": (ConvNet, lambda: [ttc.Tent(optimizer=SGD, episodic=True, steps=2)]),  # 1 step: source model
}

if __name__ == "__main__":
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    for name, (make_model, make_callbacks) in CONFIGS.items():
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            callbacks=[*make_callbacks(), ttc.PredictionWriter(str(out / f"{name}.pt"))],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.predict(make_model(), DataLoader(TensorDataset(inputs()), batch_size=BATCH), return_predictions=False)
