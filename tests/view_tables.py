"""A model whose output for each (view, sample) is preset, to test merges and uncertainty on chosen numbers."""

import torch
from torch import nn

import ttc_lightning as ttc


class TableModel(nn.Module):
    """Returns preset outputs ``table[view, sample]``; the view is read from the pixel value that ``add`` shifted.

    Inputs are ``1000 * sample`` (see :func:`table_input`); view ``v`` of ``Add(range(V))`` adds ``v``.
    """

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = x.reshape(x.shape[0], -1)[:, 0].round().long()
        return self.table[code % 1000, code // 1000]


def table_input(batch: int) -> torch.Tensor:
    return (1000.0 * torch.arange(batch)).view(batch, 1, 1, 1)


def table_tta(table: torch.Tensor, chunk_size=None, **options):
    """Output of ``TTAWrapper`` around :class:`TableModel` over the ``table.shape[0]`` views of ``Add``."""
    views = table.shape[0]
    wrapper = ttc.TTAWrapper(TableModel(table), transforms=ttc.Add(range(views)), chunk_size=chunk_size, **options)
    return wrapper(table_input(table.shape[1]))
