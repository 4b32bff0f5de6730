"""The output format: a prediction's structure (tensors in dicts with str keys, lists and tuples), its check from
batch to batch, and the merged output on disk, one file or shards with an index (:func:`load_predictions`).

Every tensor of a prediction holds the batch's samples along dim 0; the output concatenates them along it, keeping
the structure. Everything saved loads with ``torch.load(..., weights_only=True)``.
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

#: The ``format`` of the index that a sharded output's file holds (see :func:`shard_index`).
SHARDS_FORMAT = "ttc_lightning.shards"

#: The structure of a prediction with each tensor replaced by its position in the list of tensors.
Skeleton = int | dict[str, "Skeleton"] | list["Skeleton"] | tuple["Skeleton", ...]
#: A prediction's skeleton and, per tensor, its shape without the sample dimension and its dtype.
Template = tuple[Skeleton, list[tuple[tuple[int, ...], torch.dtype]]]


def flatten(output: Any) -> tuple[Skeleton, list[Tensor]]:
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


def unflatten(skeleton: Skeleton, leaves: Sequence[Tensor]) -> Any:
    """The prediction whose structure is ``skeleton`` and whose tensors are ``leaves`` (the inverse of
    :func:`flatten`)."""
    if isinstance(skeleton, int):
        return leaves[skeleton]
    if isinstance(skeleton, dict):
        return {key: unflatten(item, leaves) for key, item in skeleton.items()}
    items = [unflatten(item, leaves) for item in skeleton]
    return items if isinstance(skeleton, list) else tuple(items)


def leaf_names(skeleton: Skeleton, where: str = "prediction") -> dict[int, str]:
    """Each tensor position of ``skeleton`` with its name, e.g. ``prediction['logits']``."""
    if isinstance(skeleton, int):
        return {skeleton: where}
    items = skeleton.items() if isinstance(skeleton, dict) else enumerate(skeleton)
    return {k: v for key, item in items for k, v in leaf_names(item, f"{where}[{key!r}]").items()}


def template(skeleton: Skeleton, leaves: Sequence[Tensor]) -> Template:
    """What every batch of one dataloader must share: the structure, and each tensor's trailing shape and dtype."""
    return skeleton, [(tuple(leaf.shape[1:]), leaf.dtype) for leaf in leaves]


def check_template(known: Template, found: Template, where: str) -> None:
    """Raise unless ``found`` (a batch's structure, trailing shapes and dtypes) equals the first batch's."""
    if found[0] != known[0]:
        raise ValueError(
            f"PredictionWriter: {where} has the structure {found[0]} but earlier batches had {known[0]} (numbers are "
            "tensor positions); every batch must return the same keys, in the same order, and the same nesting."
        )
    names = leaf_names(known[0])
    for position, (was, now) in enumerate(zip(known[1], found[1], strict=True)):
        if was != now:
            raise ValueError(
                f"PredictionWriter: {names[position]} in {where} has per-sample shape {now[0]} and dtype {now[1]}, "
                f"but {was[0]} and {was[1]} in earlier batches; predictions are concatenated along dim 0, so all "
                "but the first dimension and the dtype must agree."
            )


def shard_index(names: list[str], sizes: list[int]) -> dict[str, Any]:
    """The index a sharded output's file holds: the shards' file names (next to it) and their numbers of samples."""
    return {"format": SHARDS_FORMAT, "shards": names, "sizes": sizes}


def _is_index(saved: Any) -> bool:
    return isinstance(saved, dict) and isinstance(saved.get("format"), str) and saved["format"] == SHARDS_FORMAT


def _concatenate_shards(folder: str, index: dict[str, Any]) -> Any:
    pieces = [flatten(torch.load(os.path.join(folder, name), weights_only=True)) for name in index["shards"]]
    columns = zip(*(leaves for _, leaves in pieces), strict=True)
    return unflatten(pieces[0][0], [torch.cat(column) for column in columns])


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
