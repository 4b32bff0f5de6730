"""The callback :class:`PredictionWriter`: checks the predict dataloaders, writes each rank's batches to its part
file, and has rank 0 merge the parts when the run ends."""

import os
import uuid
from collections.abc import Sequence, Sized
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.data import sized_len
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler
from typing_extensions import override

from ttc_lightning.checks import check_int, check_trainer
from ttc_lightning.lightning_internals import records_batch_indices
from ttc_lightning.ttt.sync import broadcast_object
from ttc_lightning.writer.format import Template, check_template, flatten, leaf_names, template
from ttc_lightning.writer.merge import HINT, merge_parts
from ttc_lightning.writer.parts import PartWriter, part_path


def _broadcast(trainer: pl.Trainer, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank, as ``trainer.strategy.broadcast`` gives it, but returning only once the process
    group has let go of the tensors it travelled in (see :mod:`ttc_lightning.ttt.sync`)."""
    return broadcast_object(obj) if isinstance(trainer.strategy, ParallelStrategy) else obj


class PredictionWriter(BasePredictionWriter):
    """Write every prediction exactly once, in dataset order, into one file, on one device or many.

    ``torch.load(path)`` (or :func:`load_predictions`) gives the concatenated output: a tensor when ``predict_step``
    returns a tensor, a dict of concatenated tensors when it returns a dict (as the strategies do when extras are
    requested: ``{"prediction": ..., "uncertainty": ...}``), and lists and tuples (nested too) likewise. Every tensor
    of a prediction holds the batch's samples along dim 0; all other dimensions and the dtype must be the same in every
    batch. With several predict dataloaders the file holds a list with one such output per dataloader (``None`` for
    one without samples).

    How it works: each rank copies every batch's prediction to the CPU and appends it, with the dataset indices
    Lightning records for a prediction writer, to a part file ``{path}.rank{r}.part`` next to ``path``; the writer
    keeps nothing in memory, so it works with ``trainer.predict(..., return_predictions=False)`` and with
    ``strategy="ddp_spawn"`` (which requires it). When the run ends, rank 0 merges the parts in dataset order while
    the other ranks wait, then every rank returns; a merge error is raised on every rank, and the parts are kept. The
    merge of one file holds the whole output in rank 0's memory; with shards it holds one shard and one batch per
    rank. For outputs that take rank 0 longer than the process group's timeout to merge, raise
    ``DDPStrategy(timeout=...)`` or use ``merge=False`` and :func:`merge_parts`.

    Checks: with several ranks, a predict dataloader whose sampler gives every rank the whole dataset
    (``Trainer(use_distributed_sampler=False)`` with a plain sampler) or pads or drops samples (torch's
    ``DistributedSampler`` on a split that is not even) is refused before any batch runs; whatever reaches the merge
    must cover the dataset indices ``0..N-1`` exactly once, or the merge raises and names the missing and repeated
    indices. ``limit_predict_batches`` and ``fast_dev_run`` would leave samples out: refused.

    Iterable datasets (and other loaders without a batch sampler) carry no dataset indices: on one device their
    predictions are written in arrival order; on several ranks they are refused. Lightning's own sampler refuses a
    rank without samples (more ranks than samples) with an ``AssertionError``; a custom sampler that leaves a rank
    empty works (with ``allow_zero_length_dataloader_with_multiple_devices``).

    Several nodes: ``path`` must be on a filesystem all nodes share. Without one, pass ``merge=False``, copy every
    node's part files next to ``path`` on one machine, and call :func:`merge_parts`.

    Args:
        path: The output file; its folder is created if missing. Part files, shards and a temporary file go next to it.
        shard_size: ``None`` (default) writes one file. An int writes shards of that many samples,
            ``{stem}.00000{suffix}``, ... (``{stem}.dl{d}.00000{suffix}`` with several dataloaders), merged in one
            pass with one shard in memory, and ``path`` holds the index that :func:`load_predictions` reads. Shards
            need each rank's samples in dataset order: a shuffled predict dataloader is refused. Shards beyond the
            index left by an earlier run into the same ``path`` are not removed.
        merge: ``True`` (default) merges on rank 0 at the end of the run; ``False`` leaves the part files for
            :func:`merge_parts` (``shard_size`` is then refused: pass it to :func:`merge_parts`).

    Example::

        trainer = L.Trainer(accelerator="gpu", devices=4, strategy="ddp", callbacks=[ttc.PredictionWriter("preds.pt")])
        trainer.predict(model, dataloaders=loader, return_predictions=False)
        predictions = torch.load("preds.pt")  # all samples, in the order of loader.dataset

    Raises:
        ValueError: for a ``path`` that is not a file name, a ``shard_size`` below 1, a non-bool ``merge``, or a
            ``shard_size`` with ``merge=False``.
    """

    def __init__(self, path: str | os.PathLike, shard_size: int | None = None, merge: bool = True) -> None:
        super().__init__(write_interval="batch")
        if not isinstance(path, str | os.PathLike) or not os.fspath(path) or os.path.isdir(path):
            raise ValueError(f"`path`={path!r} must be the name of a file (a non-empty str or path, not a folder).")
        if shard_size is not None:
            check_int("shard_size", shard_size, 1)
        if not isinstance(merge, bool):
            raise ValueError(f"`merge`={merge!r} must be a bool.")
        if not merge and shard_size is not None:
            raise ValueError(
                f"`shard_size`={shard_size} has no effect: shards are written by the merge at the end of the run, and "
                f"merge=False leaves the part files unmerged. Pass it to merge_parts(path, shard_size={shard_size}) "
                "when you merge them, or use merge=True."
            )
        self.path = os.fspath(path)
        self.shard_size = shard_size
        self.merge = merge
        self._run = ""
        self._part: PartWriter | None = None
        self._indexed: list[bool] = []
        self._counts: list[int] = []
        self._last: list[int] = []
        self._ordered: list[bool] = []
        self._templates: dict[int, Template] = {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        check_trainer(trainer, "PredictionWriter")
        self._run = _broadcast(trainer, uuid.uuid4().hex)
        self._part, self._indexed, self._counts, self._last, self._ordered, self._templates = None, [], [], [], [], {}
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def _check_dataloader(self, trainer: pl.Trainer, dataloader: int, loader: object) -> int | None:
        """Refuse a dataloader that would leave samples out or repeat them; return its dataset length (``None``
        when unknown), and note whether it gives dataset indices."""
        batch_sampler = getattr(loader, "batch_sampler", None)
        indexed = records_batch_indices(loader)
        self._indexed.append(indexed)
        where = f"PredictionWriter: predict dataloader {dataloader}"
        if not indexed:
            if trainer.world_size > 1:
                raise RuntimeError(
                    f"{where} gives no dataset indices (an IterableDataset, a DataLoader without a batch size, or "
                    f"another iterable), so on {trainer.world_size} ranks which samples each rank predicts is unknown. "
                    "Use a map-style dataset with a batch size, or one device (predictions are then written in "
                    "arrival order)."
                )
            return None
        batches = sized_len(loader)
        if batches is not None and trainer.num_predict_batches[dataloader] < batches:
            raise ValueError(
                f"{where} runs {trainer.num_predict_batches[dataloader]} of its {batches} batches "
                "(limit_predict_batches or fast_dev_run), which would leave samples out; predict a Subset instead."
            )
        sampler = getattr(batch_sampler, "sampler", None)
        if trainer.world_size > 1 and isinstance(sampler, SequentialSampler | RandomSampler):
            raise RuntimeError(
                f"{where} uses a {type(sampler).__name__} on {trainer.world_size} ranks, so every rank would predict "
                f"the whole dataset and write each sample {trainer.world_size} times. {HINT}"
            )
        if type(sampler) is DistributedSampler and len(sampler.dataset) % sampler.num_replicas:  # type: ignore[arg-type]
            evens_out = "drops" if sampler.drop_last else "repeats"
            raise RuntimeError(
                f"{where} uses torch's DistributedSampler on {len(sampler.dataset)} samples and "  # type: ignore[arg-type]
                f"{sampler.num_replicas} ranks, which {evens_out} samples to even out the split. {HINT}"
            )
        if self.shard_size is not None and (isinstance(sampler, RandomSampler) or getattr(sampler, "shuffle", False)):
            raise ValueError(
                f"{where} shuffles, but `shard_size`={self.shard_size} needs each rank's samples in dataset order. "
                "Use shuffle=False, or shard_size=None."
            )
        return len(loader.dataset) if isinstance(getattr(loader, "dataset", None), Sized) else None  # type: ignore[attr-defined]

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaders = CombinedLoader(trainer.predict_dataloaders, "sequential").flattened
        lengths = [self._check_dataloader(trainer, d, loader) for d, loader in enumerate(loaders)]
        self._counts, self._last, self._ordered = [0] * len(loaders), [-1] * len(loaders), [True] * len(loaders)
        self._open(trainer, lengths)

    def _open(self, trainer: pl.Trainer, lengths: list[int | None] | None) -> None:
        header = {"run": self._run, "rank": trainer.global_rank, "world_size": trainer.world_size, "lengths": lengths}
        self._part = PartWriter(part_path(self.path, trainer.global_rank), header)

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        assert self._part is not None
        skeleton, leaves = flatten(prediction)
        where = f"batch {batch_idx} of predict dataloader {dataloader_idx}"
        names = leaf_names(skeleton)
        if self._indexed[dataloader_idx]:
            size = len(batch_indices or ())
            indices = torch.tensor(batch_indices, dtype=torch.long)
        else:
            size = leaves[0].shape[0] if leaves[0].ndim else 0
            indices = torch.arange(self._counts[dataloader_idx], self._counts[dataloader_idx] + size)
        for position, leaf in enumerate(leaves):
            if leaf.ndim == 0 or leaf.shape[0] != size:
                raise ValueError(
                    f"PredictionWriter: {names[position]} has shape {tuple(leaf.shape)} in {where}, which has {size} "
                    "samples; every tensor of a prediction must hold the batch's samples along dim 0."
                )
        found = template(skeleton, leaves)
        check_template(self._templates.setdefault(dataloader_idx, found), found, where)
        copies = [leaf.detach().to("cpu", copy=True) for leaf in leaves]  # compact: a view would save its whole base
        self._part.write(dataloader_idx, {"indices": indices, "skeleton": skeleton, "leaves": copies})
        self._counts[dataloader_idx] += size
        if size:  # an iterable dataset's batch may be empty
            increasing = bool((indices[1:] > indices[:-1]).all()) and int(indices[0]) > self._last[dataloader_idx]
            self._ordered[dataloader_idx] &= increasing
            self._last[dataloader_idx] = int(indices[-1])

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if self._part is None:  # Lightning skipped the loop on this rank (no batches): an empty part
            self._open(trainer, None)
        assert self._part is not None
        self._part.close({"samples": self._counts, "ordered": self._ordered})
        self._part = None
        trainer.strategy.barrier("PredictionWriter.merge")
        error: Exception | None = None
        if trainer.is_global_zero and self.merge:
            try:
                merge_parts(self.path, self.shard_size)
            except Exception as exception:  # raised on every rank below
                error = exception
        message = _broadcast(trainer, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"PredictionWriter: rank 0 could not merge the predictions: {message}")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._part is not None:
            self._part.close(None)
            self._part = None
