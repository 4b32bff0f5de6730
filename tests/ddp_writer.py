"""PredictionWriter on 2 CPU processes over gloo; run by tests/test_writer.py.

Usage: python ddp_writer.py {ddp,ddp_spawn} OUT  (writes OUT/<config>.pt files, and OUT/errors.rank<r>.pt: per
configuration the error each rank raised, ``None`` when it ran through)
"""

import logging
import os
import sys
import warnings

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

from ttc_lightning.writer import PredictionWriter

SAMPLES, BATCH, FEATURES, CLASSES = 17, 4, 6, 3  # rank 0: 9 samples (3 batches), rank 1: 8 samples (2 batches)


def inputs(n: int = SAMPLES, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(seed))


def mlp() -> nn.Sequential:
    """A batch-independent model: the reference runs it on the whole input at once."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))


class Net(L.LightningModule):
    """``predict_step`` returns the logits, or with ``extras`` a dict of the logits and the batch's dataset indices
    (the dataset's second tensor) and a tuple (row sums, first feature)."""

    def __init__(self, extras: bool = False) -> None:
        super().__init__()
        self.allow_zero_length_dataloader_with_multiple_devices = True  # for a rank without samples
        self.net = mlp()
        self.extras = extras

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        x, index = batch
        logits = self.net(x)
        if not self.extras:
            return logits
        return {"prediction": logits, "index": index, "parts": (x.sum(1), x[:, :1])}


def loader(n: int = SAMPLES, batch_size: int = BATCH, seed: int = 1, **kwargs) -> DataLoader:
    return DataLoader(TensorDataset(inputs(n, seed), torch.arange(n)), batch_size=batch_size, **kwargs)


class Stream(IterableDataset):
    def __iter__(self):
        return iter(zip(inputs(), torch.arange(SAMPLES), strict=True))


class StrideSampler(DistributedSampler):
    """Rank r gets r, r + world, ...: like Lightning's sampler, without its assertion that no rank is empty; the rank
    is read when the sampler is used (a DistributedSampler, so that Lightning keeps it)."""

    def __init__(self, n: int) -> None:
        super().__init__(range(n), num_replicas=1, rank=0)

    def _indices(self) -> range:
        return range(dist.get_rank(), len(self.dataset), dist.get_world_size())

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


class EverythingSampler(StrideSampler):
    """Every rank gets the whole dataset, unnoticed before the run (a custom DistributedSampler)."""

    def _indices(self) -> range:
        return range(len(self.dataset))


def configs(out: str) -> dict:
    """name: (writer, module, dataloaders, extra Trainer arguments, return_predictions)."""
    return {
        "tensor": (PredictionWriter(f"{out}/tensor.pt"), Net(), loader(), {}, True),
        "dict_shards": (PredictionWriter(f"{out}/dict_shards.pt", shard_size=5), Net(True), loader(), {}, False),
        "batch_one": (PredictionWriter(f"{out}/batch_one.pt"), Net(True), loader(batch_size=1), {}, False),
        "two_loaders": (PredictionWriter(f"{out}/two.pt"), Net(), [loader(), loader(5, 3, seed=2)], {}, True),
        "unmerged": (PredictionWriter(f"{out}/unmerged.pt", merge=False), Net(True), loader(), {}, False),
        "empty_rank": (
            PredictionWriter(f"{out}/empty_rank.pt"),
            Net(True),
            DataLoader(TensorDataset(inputs(1), torch.arange(1)), sampler=StrideSampler(1)),
            {},
            False,
        ),
        "repeating_sampler": (
            PredictionWriter(f"{out}/repeated.pt"),
            Net(),
            DataLoader(TensorDataset(inputs(), torch.arange(SAMPLES)), sampler=EverythingSampler(SAMPLES)),
            {},
            True,
        ),
        "no_distributed_sampler": (
            PredictionWriter(f"{out}/never.pt"),
            Net(),
            loader(),
            {"use_distributed_sampler": False},
            True,
        ),
        "torch_sampler": (
            PredictionWriter(f"{out}/never.pt"),
            Net(),
            loader(sampler=DistributedSampler(range(SAMPLES), 2, 0, shuffle=False)),
            {},
            True,
        ),
        "iterable": (PredictionWriter(f"{out}/never.pt"), Net(), DataLoader(Stream(), batch_size=BATCH), {}, True),
    }


def spawn_configs(out: str) -> dict:
    return {"spawn": (PredictionWriter(f"{out}/spawn.pt", shard_size=4), Net(True), loader(), {}, False)}


if __name__ == "__main__":
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    strategy, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    errors = {}
    for name, (writer, module, dataloaders, options, keep) in (configs if strategy == "ddp" else spawn_configs)(
        out
    ).items():
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            callbacks=[writer],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            **options,
        )
        try:
            trainer.predict(module, dataloaders, return_predictions=keep)
            errors[name] = None
        except Exception as error:
            errors[name] = f"{type(error).__name__}: {error}"
    if strategy == "ddp":  # ddp_spawn runs the stage in children: the parent is rank 0 of nothing
        torch.save(errors, f"{out}/errors.rank{trainer.global_rank}.pt")
    else:
        torch.save(errors, f"{out}/errors.rank0.pt")
