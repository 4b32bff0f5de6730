"""The distributed merge: the ranks' part files into one output in dataset order, every dataset index exactly
once, in one file or in shards (:func:`merge_parts`).

Without shards the ranks' batches may come in any order and the whole output is held in memory; with shards each
rank's indices must increase, so that one pass with one batch per rank in memory fills each shard.
"""

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ttc_lightning.checks import check_int
from ttc_lightning.writer.format import Template, check_template, shard_index, template, unflatten
from ttc_lightning.writer.parts import Part, part_path

#: What a run must do for every dataset index to be written exactly once.
HINT = (
    "Each sample must reach exactly one rank once: keep Trainer(use_distributed_sampler=True) (the default: Lightning "
    "then splits the data over the ranks without repeats), and use no sampler that pads or drops samples "
    "(torch's DistributedSampler on an uneven split, drop_last)."
)


def _save(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary file, so that ``path`` never holds a partial file."""
    temporary = f"{path}.tmp"
    torch.save(obj, temporary)
    os.replace(temporary, path)


class _Cursor:
    """A position in one part's batches of one dataloader; one batch in memory at a time."""

    def __init__(self, part: Part, dataloader: int) -> None:
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
        f"{'; '.join(problems)}. {HINT} The part files are kept."
    )


def _merge(parts: Sequence[Part], dataloader: int, length: int, shard_size: int | None) -> Iterator[tuple[Any, int]]:
    """Yield the output of ``dataloader`` in windows of ``shard_size`` samples (one window without), in dataset order,
    each with its size. Without shards the ranks' batches may come in any order; with shards each rank's indices must
    increase, so that one pass with one batch per rank in memory fills each window."""
    ordered = shard_size is not None
    cursors = [_Cursor(part, dataloader) for part in parts]
    known: Template | None = None
    for start in range(0, length, shard_size or length):
        stop = min(start + (shard_size or length), length)
        counts = torch.zeros(stop - start, dtype=torch.int32)
        buffers: list[Tensor] = []
        for cursor in cursors:
            while (record := cursor.record) is not None:
                if cursor.fresh:
                    found = template(record["skeleton"], record["leaves"])
                    known = known or found
                    check_template(known, found, f"a batch of dataloader {dataloader} in {cursor.part.path}")
                    cursor.fresh = False
                if not buffers:
                    buffers = [torch.empty((stop - start, *shape), dtype=dtype) for shape, dtype in known[1]]
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
        yield unflatten(known[0], buffers), stop - start
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
    return shard_index(names, sizes) if names else None


def _read_parts(path: str, shard_size: int | None) -> list[Part]:
    """Every rank's part of the run that wrote ``path``, checked to come from one run (and, for shards, to hold
    increasing indices)."""
    first = Part(part_path(path, 0))
    world_size = first.header["world_size"]
    missing = [part_path(path, rank) for rank in range(1, world_size) if not os.path.exists(part_path(path, rank))]
    if missing:
        raise FileNotFoundError(
            f"PredictionWriter: the part files {missing} of a run on {world_size} ranks are missing. On several nodes "
            "`path` must be on a filesystem every node shares; otherwise run PredictionWriter(..., merge=False), copy "
            "every node's part files next to `path` on one machine and call ttc_lightning.merge_parts(path)."
        )
    parts = [first] + [Part(part_path(path, rank)) for rank in range(1, world_size)]
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
    return parts


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
    parts = _read_parts(path, shard_size)
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
