"""Part files: each rank appends its batches, with their dataset indices, to its own ``{path}.rank{r}.part``.

A part file is a sequence of frames: a tag and a payload size (two little-endian 64-bit integers), then a
``torch.save`` payload. Tag -1 is the header (run id, rank, world size, dataset lengths), tag -2 the footer (samples
written per dataloader, and whether their indices increased), a tag ``d >= 0`` one batch of dataloader ``d`` (its
dataset indices, the structure of the prediction and its tensors). Everything saved loads with
``torch.load(..., weights_only=True)``.
"""

import io
import os
import struct
from collections.abc import Iterator
from typing import Any

import torch

_FRAME = struct.Struct("<qQ")
_HEADER, _FOOTER = -1, -2
_PART_FORMAT = "ttc_lightning.part"


def part_path(path: str, rank: int) -> str:
    """The part file of ``rank`` for the output ``path``."""
    return f"{path}.rank{rank}.part"


class PartWriter:
    """Appends frames to one rank's part file."""

    def __init__(self, path: str, header: dict[str, Any]) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 - kept open across the hooks of a predict run
        self.write(_HEADER, {"format": _PART_FORMAT, **header})

    def write(self, tag: int, payload: Any) -> None:
        """Append one frame: ``tag`` and ``payload`` as ``torch.save`` writes it."""
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        self._file.write(_FRAME.pack(tag, buffer.tell()))
        self._file.write(buffer.getbuffer())

    def close(self, footer: dict[str, Any] | None) -> None:
        """Write ``footer`` (``None`` after a failure: the part stays incomplete) and close the file."""
        if footer is not None:
            self.write(_FOOTER, footer)
        self._file.close()


class Part:
    """One rank's part file: its frames' positions, header and footer; batches are loaded on demand.

    Raises:
        RuntimeError: ``path`` is truncated, not a part file, or incomplete (its rank failed or is still running).
    """

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
