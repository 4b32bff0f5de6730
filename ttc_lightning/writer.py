"""Predictions written exactly once, in dataset order, into one file (or shards and an index), on one device or many.

Each rank appends its batches, with their dataset indices, to its own part file ``{path}.rank{r}.part`` as they come
(so memory stays bounded with ``return_predictions=False``). When the stage ends, after a barrier, rank 0 merges the
parts into ``path`` in dataset order, checks that every index of the dataset was written exactly once, and removes
the parts. A part file is a sequence of frames: a tag and a payload size (two little-endian 64-bit integers), then a
``torch.save`` payload. Tag -1 is the header (run id, rank, world size, dataset lengths), tag -2 the footer (samples
written per dataloader, and whether their indices increased), a tag ``d >= 0`` one batch of dataloader ``d`` (its
dataset indices, the structure of the prediction and its tensors). Everything saved loads with
``torch.load(..., weights_only=True)``.
"""

import io
import os
import struct
import uuid
from collections.abc import Iterator, Mapping, Sequence, Sized
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.data import sized_len
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.overrides.distributed import _IndexBatchSamplerWrapper
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from torch import Tensor
from torch.utils.data import DistributedSampler, RandomSampler, SequentialSampler
from typing_extensions import override

from ttc_lightning.checks import check_int, check_trainer
from ttc_lightning.ttt.sync import broadcast_object

_FRAME = struct.Struct("<qQ")
_HEADER, _FOOTER = -1, -2
_PART_FORMAT = "ttc_lightning.part"
_SHARDS_FORMAT = "ttc_lightning.shards"
_HINT = (
    "Each sample must reach exactly one rank once: keep Trainer(use_distributed_sampler=True) (the default: Lightning "
    "then splits the data over the ranks without repeats), and use no sampler that pads or drops samples "
    "(torch's DistributedSampler on an uneven split, drop_last)."
)

#: The structure of a prediction with each tensor replaced by its position in the list of tensors.
Skeleton = int | dict[str, "Skeleton"] | list["Skeleton"] | tuple["Skeleton", ...]
#: A prediction's skeleton and, per tensor, its shape without the sample dimension and its dtype.
Template = tuple[Skeleton, list[tuple[tuple[int, ...], torch.dtype]]]


def _flatten(output: Any) -> tuple[Skeleton, list[Tensor]]:
    """Split a prediction into its skeleton and its tensors, refusing anything but tensors, dicts with str keys,
    lists and tuples."""
    leaves: list[Tensor] = []

    def visit(value: Any, where: str) -> Skeleton:
        if isinstance(value, Tensor):
            leaves.append(value)
            return len(leaves) - 1
        if isinstance(value, Mapping):
            for key in value:
                if not isinstance(key, str):
                    raise TypeError(f"PredictionWriter: {where} has the key {key!r}; dict keys must be str.")
            return {key: visit(item, f"{where}[{key!r}]") for key, item in value.items()}
        if isinstance(value, list | tuple):
            items = [visit(item, f"{where}[{i}]") for i, item in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        raise TypeError(
            f"PredictionWriter writes tensors and dicts (str keys), lists and tuples of them; {where} is a "
            f"{type(value).__name__}."
        )

    skeleton = visit(output, "the prediction")
    if not leaves:
        raise TypeError(f"PredictionWriter: the prediction {output!r} holds no tensor.")
    return skeleton, leaves


def _unflatten(skeleton: Skeleton, leaves: Sequence[Tensor]) -> Any:
    if isinstance(skeleton, int):
        return leaves[skeleton]
    if isinstance(skeleton, dict):
        return {key: _unflatten(item, leaves) for key, item in skeleton.items()}
    items = [_unflatten(item, leaves) for item in skeleton]
    return items if isinstance(skeleton, list) else tuple(items)


def _leaf_names(skeleton: Skeleton, where: str = "prediction") -> dict[int, str]:
    """Each tensor position of ``skeleton`` with its name, e.g. ``prediction['logits']``."""
    if isinstance(skeleton, int):
        return {skeleton: where}
    items = skeleton.items() if isinstance(skeleton, dict) else enumerate(skeleton)
    return {k: v for key, item in items for k, v in _leaf_names(item, f"{where}[{key!r}]").items()}


def _template(skeleton: Skeleton, leaves: Sequence[Tensor]) -> Template:
    return skeleton, [(tuple(leaf.shape[1:]), leaf.dtype) for leaf in leaves]


def _check_template(known: Template, found: Template, where: str) -> None:
    """Raise unless ``found`` (a batch's structure, trailing shapes and dtypes) equals the first batch's."""
    if found[0] != known[0]:
        raise ValueError(
            f"PredictionWriter: {where} has the structure {found[0]} but earlier batches had {known[0]} (numbers are "
            "tensor positions); every batch must return the same keys, in the same order, and the same nesting."
        )
    names = _leaf_names(known[0])
    for position, (was, now) in enumerate(zip(known[1], found[1], strict=True)):
        if was != now:
            raise ValueError(
                f"PredictionWriter: {names[position]} in {where} has per-sample shape {now[0]} and dtype {now[1]}, "
                f"but {was[0]} and {was[1]} in earlier batches; predictions are concatenated along dim 0, so all "
                "but the first dimension and the dtype must agree."
            )


def _broadcast(trainer: pl.Trainer, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank, as ``trainer.strategy.broadcast`` gives it, but returning only once the process
    group has let go of the tensors it travelled in (see :mod:`ttc_lightning.ttt.sync`)."""
    return broadcast_object(obj) if isinstance(trainer.strategy, ParallelStrategy) else obj


def _part_path(path: str, rank: int) -> str:
    return f"{path}.rank{rank}.part"


def _save(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary file, so that ``path`` never holds a partial file."""
    temporary = f"{path}.tmp"
    torch.save(obj, temporary)
    os.replace(temporary, path)


class _PartWriter:
    """Appends frames to one rank's part file."""

    def __init__(self, path: str, header: dict[str, Any]) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - kept open across the hooks of a predict run
        self.write(_HEADER, {"format": _PART_FORMAT, **header})

    def write(self, tag: int, payload: Any) -> None:
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        self._file.write(_FRAME.pack(tag, buffer.tell()))
        self._file.write(buffer.getbuffer())

    def close(self, footer: dict[str, Any] | None) -> None:
        """Write ``footer`` (``None`` after a failure: the part stays incomplete) and close the file."""
        if footer is not None:
            self.write(_FOOTER, footer)
        self._file.close()


class _Part:
    """One rank's part file: its frames' positions, header and footer; batches are loaded on demand."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.frames: list[tuple[int, int, int]] = []
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            while head := file.read(_FRAME.size):
                if len(head) < _FRAME.size or file.tell() + _FRAME.unpack(head)[1] > size:
                    raise RuntimeError(f"PredictionWriter: the part file {path} is truncated.")
                tag, nbytes = _FRAME.unpack(head)
                self.frames.append((tag, file.tell(), nbytes))
                file.seek(nbytes, os.SEEK_CUR)
        header = self._load(self.frames[0]) if self.frames and self.frames[0][0] == _HEADER else None
        if not isinstance(header, dict) or header.get("format") != _PART_FORMAT:
            raise RuntimeError(f"PredictionWriter: {path} is not a part file of PredictionWriter.")
        if self.frames[-1][0] != _FOOTER:
            raise RuntimeError(
                f"PredictionWriter: the part file {path} is incomplete: its rank failed or is still running."
            )
        self.header: dict[str, Any] = header
        self.footer: dict[str, Any] = self._load(self.frames[-1])

    def _load(self, frame: tuple[int, int, int]) -> Any:
        with open(self.path, "rb") as file:
            file.seek(frame[1])
            return torch.load(io.BytesIO(file.read(frame[2])), weights_only=True)

    def records(self, dataloader: int) -> Iterator[dict[str, Any]]:
        """The batches of ``dataloader``, in the order they were written."""
        with open(self.path, "rb") as file:
            for tag, offset, nbytes in self.frames:
                if tag == dataloader:
                    file.seek(offset)
                    yield torch.load(io.BytesIO(file.read(nbytes)), weights_only=True)


class _Cursor:
    """A position in one part's batches of one dataloader; one batch in memory at a time."""

    def __init__(self, part: _Part, dataloader: int) -> None:
        self.part = part
        self._records = part.records(dataloader)
        self.advance()

    def advance(self) -> None:
        """Load the next batch (``record`` becomes ``None`` after the last); ``fresh`` until its template is checked."""
        self.record: dict[str, Any] | None = next(self._records, None)
        self.position = 0
        self.fresh = self.record is not None


def _check_counts(counts: Tensor, start: int, dataloader: int) -> None:
    """Raise unless every dataset index of the window starting at ``start`` was written exactly once."""
    if bool((counts == 1).all()):
        return
    problems = []
    for label, wrong in (("never written", counts == 0), ("written more than once", counts > 1)):
        found = wrong.nonzero().flatten() + start
        if found.numel():
            problems.append(f"{found.numel()} {label} (first: {found[:8].tolist()})")
    raise RuntimeError(
        f"PredictionWriter: of the dataset indices {start}..{start + len(counts) - 1} of dataloader {dataloader}, "
        f"{'; '.join(problems)}. {_HINT} The part files are kept."
    )


def _merge(parts: Sequence[_Part], dataloader: int, length: int, shard_size: int | None) -> Iterator[tuple[Any, int]]:
    """Yield the output of ``dataloader`` in windows of ``shard_size`` samples (one window without), in dataset order,
    each with its size. Without shards the ranks' batches may come in any order; with shards each rank's indices must
    increase, so that one pass with one batch per rank in memory fills each window."""
    ordered = shard_size is not None
    cursors = [_Cursor(part, dataloader) for part in parts]
    template: Template | None = None
    for start in range(0, length, shard_size or length):
        stop = min(start + (shard_size or length), length)
        counts = torch.zeros(stop - start, dtype=torch.int32)
        buffers: list[Tensor] = []
        for cursor in cursors:
            while (record := cursor.record) is not None:
                if cursor.fresh:
                    found = _template(record["skeleton"], record["leaves"])
                    template = template or found
                    _check_template(template, found, f"a batch of dataloader {dataloader} in {cursor.part.path}")
                    cursor.fresh = False
                if not buffers:
                    buffers = [torch.empty((stop - start, *shape), dtype=dtype) for shape, dtype in template[1]]
                indices = record["indices"]
                end = int(torch.searchsorted(indices, stop)) if ordered else len(indices)
                local = indices[cursor.position : end] - start
                if local.numel():
                    if int(local.min()) < 0 or int(local.max()) >= stop - start:
                        outside = (local + start)[(local < 0) | (local >= stop - start)][0]
                        raise RuntimeError(
                            f"PredictionWriter: {cursor.part.path} holds the dataset index {int(outside)} for "
                            f"dataloader {dataloader}, outside 0..{length - 1}."
                        )
                    counts.index_add_(0, local, torch.ones_like(local, dtype=torch.int32))
                    for buffer, leaf in zip(buffers, record["leaves"], strict=True):
                        buffer[local] = leaf[cursor.position : end]
                if end < len(indices):
                    cursor.position = end
                    break
                cursor.advance()
        _check_counts(counts, start, dataloader)
        yield _unflatten(template[0], buffers), stop - start
    for cursor in cursors:
        if cursor.record is not None:
            beyond = int(cursor.record["indices"][cursor.position])
            raise RuntimeError(
                f"PredictionWriter: {cursor.part.path} holds the dataset index {beyond} for dataloader {dataloader}, "
                f"outside 0..{length - 1}."
            )


def _write_shards(path: str, dataloader: int, dataloaders: int, windows: Iterator[tuple[Any, int]]) -> dict | None:
    """Save each window to a shard file next to ``path``; return the index (``None`` without samples)."""
    root, extension = os.path.splitext(path)
    tag = f".dl{dataloader}" if dataloaders > 1 else ""
    names, sizes = [], []
    for number, (output, size) in enumerate(windows):
        shard = f"{root}{tag}.{number:05d}{extension}"
        _save(output, shard)
        names.append(os.path.basename(shard))
        sizes.append(size)
    return {"format": _SHARDS_FORMAT, "shards": names, "sizes": sizes} if names else None


def merge_parts(path: str | os.PathLike, shard_size: int | None = None) -> None:
    """Merge the part files ``{path}.rank{r}.part`` of a predict run into ``path`` and remove them.

    :class:`PredictionWriter` calls this on rank 0 at the end of a run. Call it yourself after a run with
    ``merge=False`` (several nodes without a shared filesystem: copy every node's part files next to ``path`` on one
    machine first), or to merge again after a failed merge, which keeps the parts.

    Args:
        path: The output file the run was given; the parts lie next to it.
        shard_size: Samples per shard file; ``None`` (default) writes one file. Shards need each rank's samples in
            dataset order (no shuffling).

    Raises:
        FileNotFoundError: A rank's part file is missing.
        RuntimeError: A part is incomplete or from another run, or some dataset index was written never or more than
            once.
    """
    path = os.fspath(path)
    if shard_size is not None:
        check_int("shard_size", shard_size, 1)
    first = _Part(_part_path(path, 0))
    world_size = first.header["world_size"]
    missing = [_part_path(path, rank) for rank in range(1, world_size) if not os.path.exists(_part_path(path, rank))]
    if missing:
        raise FileNotFoundError(
            f"PredictionWriter: the part files {missing} of a run on {world_size} ranks are missing. On several nodes "
            "`path` must be on a filesystem every node shares; otherwise run PredictionWriter(..., merge=False), copy "
            "every node's part files next to `path` on one machine and call ttc_lightning.merge_parts(path)."
        )
    parts = [first] + [_Part(_part_path(path, rank)) for rank in range(1, world_size)]
    for part in parts[1:]:
        if part.header["run"] != first.header["run"]:
            raise RuntimeError(
                f"PredictionWriter: {part.path} comes from another run than {first.path}; remove stale part files."
            )
    for part in parts if shard_size is not None else ():
        if not all(part.footer["ordered"]):
            raise RuntimeError(
                f"PredictionWriter: the dataset indices in {part.path} are not strictly increasing (a shuffled predict "
                "DataLoader, a custom sampler or repeated samples), but shards are merged in one pass that needs each "
                "rank's samples in dataset order. Use shuffle=False, or merge without shards: merge_parts(path) (the "
                "part files are kept)."
            )
    found = [part.header["lengths"] for part in parts if part.header["lengths"] is not None]
    if any(lengths != found[0] for lengths in found):
        raise RuntimeError(f"PredictionWriter: the ranks' parts disagree on the dataset lengths: {found}.")
    if not found:
        rank_zero_warn(f"PredictionWriter: nothing was predicted, so {path} was not written.")
    else:
        outputs = []
        for dataloader, length in enumerate(found[0]):
            if length is None:  # no dataset length: as many indices as samples written
                length = sum(part.footer["samples"][dataloader] for part in parts if part.footer["samples"])
            windows = _merge(parts, dataloader, length, shard_size)
            if shard_size is None:
                merged = [output for output, _ in windows]
                outputs.append(merged[0] if merged else None)
            else:
                outputs.append(_write_shards(path, dataloader, len(found[0]), windows))
        _save(outputs[0] if len(outputs) == 1 else outputs, path)
    for part in parts:
        os.remove(part.path)


def _is_index(saved: Any) -> bool:
    return isinstance(saved, dict) and isinstance(saved.get("format"), str) and saved["format"] == _SHARDS_FORMAT


def _concatenate_shards(folder: str, index: dict[str, Any]) -> Any:
    pieces = [_flatten(torch.load(os.path.join(folder, name), weights_only=True)) for name in index["shards"]]
    columns = zip(*(leaves for _, leaves in pieces), strict=True)
    return _unflatten(pieces[0][0], [torch.cat(column) for column in columns])


def load_predictions(path: str | os.PathLike) -> Any:
    """The predictions :class:`PredictionWriter` wrote to ``path``, concatenated, whether sharded or not.

    Without shards this is ``torch.load(path)``. With shards ``path`` holds an index,
    ``{"format": "ttc_lightning.shards", "shards": [file names next to path], "sizes": [samples per shard]}`` (a list
    of them with several dataloaders), and the shards are loaded and concatenated: for outputs larger than memory,
    load the shards one at a time instead.
    """
    path = os.fspath(path)
    saved = torch.load(path, weights_only=True)
    folder = os.path.dirname(path)
    if isinstance(saved, list) and any(_is_index(item) for item in saved):
        return [_concatenate_shards(folder, item) if _is_index(item) else item for item in saved]
    return _concatenate_shards(folder, saved) if _is_index(saved) else saved


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
        self._part: _PartWriter | None = None
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
        indexed = isinstance(batch_sampler, _IndexBatchSamplerWrapper)  # Lightning records the indices it yields
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
                f"the whole dataset and write each sample {trainer.world_size} times. {_HINT}"
            )
        if type(sampler) is DistributedSampler and len(sampler.dataset) % sampler.num_replicas:  # type: ignore[arg-type]
            evens_out = "drops" if sampler.drop_last else "repeats"
            raise RuntimeError(
                f"{where} uses torch's DistributedSampler on {len(sampler.dataset)} samples and "  # type: ignore[arg-type]
                f"{sampler.num_replicas} ranks, which {evens_out} samples to even out the split. {_HINT}"
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
        self._part = _PartWriter(_part_path(self.path, trainer.global_rank), header)

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
        skeleton, leaves = _flatten(prediction)
        where = f"batch {batch_idx} of predict dataloader {dataloader_idx}"
        names = _leaf_names(skeleton)
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
        found = _template(skeleton, leaves)
        _check_template(self._templates.setdefault(dataloader_idx, found), found, where)
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
