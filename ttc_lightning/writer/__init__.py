"""Predictions written exactly once, in dataset order, into one file (or shards and an index), on one device or many.

Each rank appends its batches, with their dataset indices, to its own part file ``{path}.rank{r}.part`` as they come
(so memory stays bounded with ``return_predictions=False``). When the stage ends, after a barrier, rank 0 merges the
parts into ``path`` in dataset order, checks that every index of the dataset was written exactly once, and removes
the parts.

Modules: :mod:`~.format` (a prediction's structure, the output on disk, :func:`load_predictions`), :mod:`~.parts` (the
part files), :mod:`~.merge` (the distributed merge, :func:`merge_parts`) and :mod:`~.callback`
(:class:`PredictionWriter`).
"""

from ttc_lightning.writer.callback import PredictionWriter
from ttc_lightning.writer.format import load_predictions
from ttc_lightning.writer.merge import merge_parts

__all__ = ["PredictionWriter", "load_predictions", "merge_parts"]
