"""Seeded random generators, optionally distinct per distributed process.

Strategies that draw random numbers (augmentations, restore masks, sampling seeds) draw them from a private CPU
``torch.Generator`` built here, never from torch's global generator, so runs are reproducible and independent of
other code's draws. With ``per_rank=True`` process ``r`` of a distributed run uses ``seed + r`` (distinct draws
on every rank); with ``per_rank=False`` every rank draws the same numbers (state that must stay identical across
synchronised ranks).
"""

import torch


def process_rank() -> int:
    """The rank of this process in the default ``torch.distributed`` process group, ``0`` outside one."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


def seeded_generator(seed: int, per_rank: bool = False) -> torch.Generator:
    """A CPU generator seeded with ``seed``, plus the process rank when ``per_rank``."""
    return torch.Generator().manual_seed(seed + process_rank() if per_rank else seed)
