"""Synchronized adaptation on 2 CPU processes (DDP over gloo) with uneven batch counts; run by tests/ttt/test_sync.py.

Usage: python ddp_sync.py OUT  (writes OUT.rank0.pt and OUT.rank1.pt)
"""

import functools
import logging
import sys
import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ttc_lightning as ttc

SAMPLES, BATCH = 17, 4  # 9 samples (3 batches) on rank 0, 8 (2 batches) on rank 1


def inputs() -> torch.Tensor:
    return torch.randn(SAMPLES, 3, 10, 10, generator=torch.Generator().manual_seed(1))


class Net(ttc.TestTimeComputeMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
        )
        with torch.no_grad():
            self.net[-1].weight.mul_(5)

    def forward(self, x):
        return self.net(x)


SGD = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
UPDATES, KEEP = ttc.Updates(sync=True), ttc.Persistence(keep_adapted=True)
PRESETS = {
    "tent": lambda: ttc.Tent(optimizer=SGD, updates=UPDATES, persistence=KEEP),
    "tent_steps": lambda: ttc.Tent(optimizer=SGD, steps=2, updates=UPDATES, persistence=KEEP),
    "tent_syncbn": lambda: ttc.Tent(optimizer=SGD, updates=UPDATES, persistence=KEEP),  # on a SyncBatchNorm model
    "eata": lambda: ttc.EATA(optimizer=SGD, e_margin=0.9, d_margin=0.9, updates=UPDATES, persistence=KEEP),
    "sar": lambda: ttc.SAR(optimizer=SGD, e_margin=0.9, updates=UPDATES, persistence=KEEP),
    "cotta": lambda: ttc.CoTTA(views=2, updates=UPDATES, persistence=KEEP),
    "memo": lambda: ttc.MEMO(views=2, episodic=False, updates=UPDATES, persistence=KEEP),
}

if __name__ == "__main__":
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    results = {}
    for name, make in PRESETS.items():
        model, callback = Net(), make()
        if name.endswith("syncbn"):  # SyncBatchNorm raises in train mode under gloo; the policies avoid train mode
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            callbacks=[callback],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        predictions = trainer.predict(model, DataLoader(TensorDataset(inputs()), batch_size=BATCH))
        results[name] = {
            "predictions": [p.clone() for p in predictions],
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "updates": callback.updates,
            "batches": callback.batches_seen,
        }
    torch.save(results, f"{sys.argv[1]}.rank{trainer.global_rank}.pt")
