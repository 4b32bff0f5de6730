"""TTA tasks: what the model predicts, and how each view's output is checked and mapped back to the input's frame.

``task="classification"``, ``"segmentation"``, ``"keypoints"`` and ``"boxes"`` name :class:`Classification`,
:class:`Segmentation`, :class:`Keypoints` and :class:`Boxes` with their defaults; the objects carry the options of
their task (``flip_classes``, ``flip_pairs``). Volumes ``(B, C, D, H, W)`` go through classification and
segmentation: transforms act on the last two dimensions.
"""

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from typing_extensions import override

from ttc_lightning.checks import check_unused, moved_keywords
from ttc_lightning.tta import functional as F
from ttc_lightning.tta.functional import Size
from ttc_lightning.tta.transforms import Transform, TransformSpec
from ttc_lightning.tta.views import View

Pairs = tuple[tuple[int, int], ...]


class Task:
    """What the model predicts under test-time augmentation, and how one view's output is mapped back.

    The :class:`~ttc_lightning.Augmenter` asks its task which transforms it can invert (:meth:`check_transforms`)
    and whether its options act on the views (:meth:`check_views`) at construction, and for each view's output
    whether it fits (:meth:`check_output`) and what it is in the input's frame (:meth:`deaugment`).

    How to add a task: subclass :class:`Task` and set

    - ``name``: how messages call it (add ``TASKS[name] = cls`` to accept the string ``task=name``);
    - ``inverse``: what every spatial transform must provide: ``None`` (outputs do not move),
      ``"dense"`` (:meth:`~ttc_lightning.Transform.deaugment`) or ``"points"``
      (:meth:`~ttc_lightning.Transform.deaugment_points`); transforms without it are refused;
    - ``classes``: outputs hold class scores along dim 1 (class-space merges, ``vote`` and the class uncertainty
      measures apply), and ``sample_classes``: they are ``(B, C)`` per sample (class stopping rules apply);

    then implement :meth:`check_output` and :meth:`deaugment`, and :meth:`check_views` for options that act only on
    some views. Options are the constructor's arguments, validated there.

    Example::

        class Heatmaps(ttc.tta.Task):
            name, inverse = "heatmaps", "dense"

            def check_output(self, y, classes, setting):
                if y.ndim != 4:
                    raise ValueError(f"task='heatmaps' needs (B, K, H, W) outputs; got shape {tuple(y.shape)}.")

            def deaugment(self, view, y, size):
                return view.deaugment(y, size) if view.spatial else y

        ttc.TestTimeAugmentation(transforms="d4", task=Heatmaps())
    """

    name: ClassVar[str] = "task"
    inverse: ClassVar[str | None] = None
    classes: ClassVar[bool] = False
    sample_classes: ClassVar[bool] = False

    def check_transforms(self, transforms: Sequence[Transform]) -> None:
        """Raise ``ValueError`` for a transform whose views this task cannot map back (see ``inverse``)."""
        if self.inverse is None:
            return
        for transform in transforms:
            if not transform.invertible(points=self.inverse == "points"):
                raise ValueError(
                    f"`transforms` includes {transform!r}, which has no inverse for task={self.name!r}; it moves "
                    "labels that cannot be mapped back. Use it with task='classification' only."
                )

    def check_views(self, views: Sequence[View], transforms: TransformSpec) -> None:
        """Raise ``ValueError`` for an option that cannot act on ``views`` (expanded from ``transforms``)."""

    def check_output(self, y: Tensor, classes: bool, setting: str) -> None:
        """Raise ``ValueError`` unless ``y``, one view's output, fits the task.

        Args:
            y: the output, batch first.
            classes: whether the merge settings read class scores along dim 1.
            setting: those settings, for the message (e.g. ``"merge='vote', space='prob', uncertainty=()"``).
        """
        raise NotImplementedError

    def deaugment(self, view: View, y: Tensor, size: Size) -> Tensor:
        """One view's output ``y`` (a float tensor) mapped back to the frame of the input of spatial ``size``."""
        raise NotImplementedError

    @override
    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({options})"


class _ClassScores(Task):
    """Class scores along dim 1, with class pairs that mirrored views swap."""

    classes = True

    def __init__(self, flip_classes: Sequence[Sequence[int]] | None = None) -> None:
        self.flip_classes = index_pairs("flip_classes", flip_classes)
        self._given = flip_classes

    @override
    def check_views(self, views: Sequence[View], transforms: TransformSpec) -> None:
        check_mirrored("flip_classes", self._given, self.flip_classes, views, transforms)

    def _swap(self, view: View, y: Tensor) -> Tensor:
        return swap(y, self.flip_classes, 1, "flip_classes") if view.reflects else y

    def _check_rank(self, y: Tensor, minimum: int, what: str, setting: str) -> None:
        if y.ndim < minimum:
            raise ValueError(
                f"task={self.name!r} with {setting} needs {what} outputs; the model returned shape {tuple(y.shape)}."
            )


class Classification(_ClassScores):
    """Outputs of any shape, left as they are (``(B, C)`` class scores for class-space merges).

    Args:
        flip_classes: pairs of class indices swapped in views that mirror the image (an odd number of h-flips,
            v-flips and transposes), e.g. a left/right label; refused when no view mirrors. Default ``None``.

    Raises:
        ValueError: if ``flip_classes`` is not a list of pairs of non-negative indices, each index in one pair.
    """

    name = "classification"
    sample_classes = True

    @override
    def check_output(self, y: Tensor, classes: bool, setting: str) -> None:
        self._check_rank(y, 2 if classes else 1, "(B, C) class", setting)

    @override
    def deaugment(self, view: View, y: Tensor, size: Size) -> Tensor:
        return self._swap(view, y)


class Segmentation(_ClassScores):
    """Dense outputs ``(B, C, H, W)``, mapped back with each transform's inverse.

    Outputs at a lower resolution than the input work with flips, rot90 and transpose; Scale and Resize need outputs
    at the input's resolution.

    Args:
        flip_classes: pairs of class indices swapped in mirrored views (e.g. left/right arm); refused when no view
            mirrors. Default ``None``.

    Raises:
        ValueError: if ``flip_classes`` is not a list of pairs of non-negative indices, each index in one pair.
    """

    name = "segmentation"
    inverse = "dense"

    @override
    def check_output(self, y: Tensor, classes: bool, setting: str) -> None:
        self._check_rank(y, 3, "(B, C, H, W) dense", setting)

    @override
    def deaugment(self, view: View, y: Tensor, size: Size) -> Tensor:
        return self._swap(view, view.deaugment(y, size) if view.spatial else y)


class _Coordinates(Task):
    """Outputs ``(B, N, width+)`` with ``(x, y)`` pixel coordinates first."""

    inverse = "points"
    width: ClassVar[int] = 2

    @override
    def check_output(self, y: Tensor, classes: bool, setting: str) -> None:
        if y.ndim != 3 or y.shape[-1] < self.width:
            raise ValueError(
                f"task={self.name!r} needs outputs of shape (B, N, {self.width}+) with (x, y) pixel coordinates "
                f"first; the model returned shape {tuple(y.shape)}."
            )


class Keypoints(_Coordinates):
    """Keypoints ``(B, K, 2+)``: ``(x, y)`` in continuous pixel coordinates first (the image spans ``[0, W] x [0, H]``);
    extra columns (visibility, score) pass through.

    Args:
        flip_pairs: pairs of keypoint indices swapped in mirrored views (e.g. left/right eye); refused when no view
            mirrors. Default ``None``.

    Raises:
        ValueError: if ``flip_pairs`` is not a list of pairs of non-negative indices, each index in one pair.
    """

    name = "keypoints"

    def __init__(self, flip_pairs: Sequence[Sequence[int]] | None = None) -> None:
        self.flip_pairs = index_pairs("flip_pairs", flip_pairs)
        self._given = flip_pairs

    @override
    def check_views(self, views: Sequence[View], transforms: TransformSpec) -> None:
        check_mirrored("flip_pairs", self._given, self.flip_pairs, views, transforms)

    @override
    def deaugment(self, view: View, y: Tensor, size: Size) -> Tensor:
        y = view.deaugment_points(y, size)
        return swap(y, self.flip_pairs, 1, "flip_pairs") if view.reflects else y


class Boxes(_Coordinates):
    """Boxes ``(B, N, 4+)`` in ``xyxy`` pixel coordinates; corners are re-ordered after mapping back. Box tensors of
    fixed shape merge element-wise: boxes are not matched or suppressed."""

    name = "boxes"
    width = 4

    @override
    def deaugment(self, view: View, y: Tensor, size: Size) -> Tensor:
        return F.points_as_boxes(view.deaugment_points(F.boxes_as_points(y), size))


#: The tasks ``task=`` accepts by name, built with their defaults.
TASKS: dict[str, type[Task]] = {
    "classification": Classification,
    "segmentation": Segmentation,
    "keypoints": Keypoints,
    "boxes": Boxes,
}
TaskSpec = str | Task


def resolve_task(task: TaskSpec) -> Task:
    """The task object for ``task``: a name in :data:`TASKS` (with its defaults) or a :class:`Task`.

    Raises:
        ValueError: for anything else.
    """
    if isinstance(task, Task):
        return task
    if isinstance(task, str) and task in TASKS:
        return TASKS[task]()
    allowed = ", ".join(map(repr, TASKS))
    raise ValueError(f"`task`={task!r} is not supported; allowed: {allowed}, or a ttc_lightning.tta.Task object.")


def index_pairs(name: str, pairs: Sequence[Sequence[int]] | None) -> Pairs:
    """``pairs`` as a tuple of index pairs, after checking each index is non-negative and in one pair only."""
    if pairs is None:
        return ()
    if isinstance(pairs, str) or not isinstance(pairs, Sequence):
        raise ValueError(f"`{name}`={pairs!r} must be a list of index pairs such as [(1, 2)], or None.")
    out = []
    for pair in pairs:
        pair = tuple(pair) if isinstance(pair, Sequence) and not isinstance(pair, str) else (pair,)
        if len(pair) != 2 or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in pair):
            raise ValueError(f"`{name}` entry {pair!r} must be a pair of non-negative indices.")
        out.append(pair)
    used = [i for pair in out for i in pair]
    if len(used) != len(set(used)):
        raise ValueError(f"`{name}`={pairs!r} uses an index twice; each index may appear in one pair only.")
    return tuple(out)  # type: ignore[return-value]


def check_mirrored(name: str, given: Any, pairs: Pairs, views: Sequence[View], transforms: TransformSpec) -> None:
    """Refuse index ``pairs`` (given as ``given``) when no view mirrors the image, so they could never swap."""
    if pairs and not any(view.reflects for view in views):
        check_unused(
            name,
            given,
            None,
            f"it swaps indices in mirrored views, and transforms={transforms!r} has none",
            "Add a mirroring transform (hflip, vflip, transpose; d4 and flip include one) or drop it",
        )


def swap(y: Tensor, pairs: Pairs, dim: int, name: str) -> Tensor:
    """``y`` with the entries of each index pair swapped along ``dim`` (``name`` is the option, for messages)."""
    if not pairs:
        return y
    n = y.shape[dim]
    if max(i for pair in pairs for i in pair) >= n:
        raise ValueError(f"`{name}`={pairs!r} indexes past the {n} entries of output dim {dim}.")
    order = list(range(n))
    for a, b in pairs:
        order[a], order[b] = b, a
    return y.index_select(dim, torch.tensor(order, device=y.device))


#: Keywords of the TTA classes that moved to a task object, and where to pass them now.
MOVED = {
    "flip_classes": "task=ttc.tta.Classification(flip_classes=...) or task=ttc.tta.Segmentation(flip_classes=...)",
    "flip_pairs": "task=ttc.tta.Keypoints(flip_pairs=...)",
}


#: Decorates the ``__init__`` of the TTA classes: a moved keyword says where it went.
refuse_moved = moved_keywords(MOVED, "the task object")
