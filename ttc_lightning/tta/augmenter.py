"""``Augmenter``: the test-time augmentation core shared by the Lightning callback and the plain-module wrapper."""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ttc_lightning.checks import check_bool, check_choice, check_int, check_unused
from ttc_lightning.halting import Draws, HaltingStats, halt
from ttc_lightning.ops.activations import ACTIVATIONS
from ttc_lightning.ops.merge import MERGES, SPACES, Merger, default_space
from ttc_lightning.ops.uncertainty import UNCERTAINTIES, UncertaintyAccumulator
from ttc_lightning.stopping import StoppingRule
from ttc_lightning.tta.functional import Size
from ttc_lightning.tta.registry import resolve_transforms
from ttc_lightning.tta.tasks import Task, TaskSpec, refuse_moved, resolve_task
from ttc_lightning.tta.transforms import TransformSpec
from ttc_lightning.tta.views import View, expand

#: Views per forward when ``chunk_size="auto"``: one view at a time on CPU, all views of a shape stacked on GPU (the
#: CPU choice is timed by ``benchmarks/tta_chunking.py``; the GPU choice is not measured).
AUTO_CPU_CHUNK = 1
#: Views per forward of ``chunk_size="auto"`` on every device when the forward depends on the batch (batch
#: statistics): the CPU choice, so that a composition gives the same predictions on any device.
BATCH_DEPENDENT_CHUNK = AUTO_CPU_CHUNK


def auto_chunk_size(device: torch.device) -> int | None:
    """Views per forward of ``chunk_size="auto"`` for a batch-independent forward on ``device``: 1 on CPU, every
    view of a shape (``None``) elsewhere."""
    return AUTO_CPU_CHUNK if device.type == "cpu" else None


def _uncertainty(value: bool | str | Sequence[str] | None, task: Task) -> tuple[str, ...]:
    """The uncertainty measures requested by ``value`` (``True``: every measure ``task`` supports)."""
    if value is None or value is False:
        return ()
    if value is True:
        return UNCERTAINTIES if task.classes else ("std",)
    if not isinstance(value, str | Sequence):
        raise ValueError(f"`uncertainty`={value!r} must be True, a name or a list of names among {UNCERTAINTIES}.")
    names = (value,) if isinstance(value, str) else tuple(value)
    for name in names:
        check_choice("uncertainty", name, UNCERTAINTIES)
        if name != "std" and not task.classes:
            raise ValueError(f"`uncertainty`={name!r} needs class outputs; task={task.name!r} supports only 'std'.")
    return names


def repeat_batch_first(value: Any, batch: int, times: int) -> Any:
    """``value`` repeated ``times`` along dim 0 if it is a tensor with ``batch`` rows (a batch-first forward
    argument that must follow stacked views); anything else unchanged."""
    if times > 1 and isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == batch:
        return value.repeat(times, *([1] * (value.ndim - 1)))
    return value


class Augmenter:
    """Runs a model on augmented views of a batch, maps each output back, and merges the views.

    Args:
        transforms: an alias (``hflip``, ``vflip``, ``flip``, ``d4``, ``multiscale``, ``five_crop``, ``ten_crop``),
            a registered transform name, a :class:`~ttc_lightning.Transform`, or a list of these (their product).
            Default ``"hflip"``.
        merge: ``mean``, ``sum``, ``max``, ``min``, ``median``, ``gmean``, ``tsharpen`` or ``vote`` (with a single
            view only those that differ from ``mean``: ``tsharpen``, ``vote``). Default ``"mean"``.
        task: what the model predicts, as a :mod:`~ttc_lightning.tta.tasks` object with its options, or by name
            with the defaults: ``classification`` (outputs unchanged), ``segmentation`` (dense ``(B, C, H, W)``
            outputs mapped back), ``keypoints`` (``(B, K, 2+)`` ``(x, y)`` pixel coordinates) or ``boxes``
            (``(B, N, 4+)`` xyxy). Class index pairs swapped in mirrored views are options of the task:
            ``ttc.tta.Segmentation(flip_classes=[(1, 2)])``, ``ttc.tta.Keypoints(flip_pairs=[(1, 2)])``. Default
            ``"classification"``.
        space: ``raw``, ``prob`` or ``logprob`` (see :mod:`ttc_lightning.ops.merge`); ``None`` picks ``raw``, or
            ``prob`` for ``gmean``, ``tsharpen`` and ``vote``. Default ``None``.
        activation: ``softmax`` over dim 1 or ``sigmoid`` (multi-label), for ``prob``/``logprob``, ``vote`` and
            the class uncertainty measures (refused with ``space="raw"`` and no class measure, where it has no
            effect). Default ``"softmax"``.
        uncertainty: ``True`` for every measure the task supports, or names among ``std``, ``entropy``,
            ``mutual_info``, ``agreement`` (see :mod:`ttc_lightning.ops.uncertainty`). Default ``None``.
        chunk_size: views per forward call: ``None`` stacks every view of a shape into one forward, an int bounds
            it, ``"auto"`` uses 1 on CPU (the memory of one plain forward; its speed against stacking on CPU is
            in ``benchmarks/README.md``) and ``None`` on accelerators (an assumption: no GPU run has been measured).
            Views of different shapes (non-square rot90, scales) always go in separate forwards. Refused with
            ``stop`` (one view per forward) and with a single view. Default ``"auto"``.
        stop: a :mod:`~ttc_lightning.stopping` rule for adaptive augmentation: views run one at a time in order
            (identity first) on the samples still running, and a sample stops as soon as the rule holds on the
            running mean probability of its views (whatever the merge); its output merges the views it saw.
            Needs ``chunk_size="auto"``, a merge other than ``median``, and task ``classification`` unless the rule
            is :class:`~ttc_lightning.stopping.Converged`. Default ``None`` (every view).
        min_views: views every sample gets before ``stop`` is asked (needs ``stop``; fewer than the views, unless
            ``anytime``, or the rule could never act). Default ``1``.
        anytime: with ``stop``, return each sample's merge at its best-scoring view count (by the rule's score)
            instead of its last. Default ``False``.
        return_views: with ``stop``, add each sample's number of views as the extra ``views``. Default ``False``.

    Further positional and keyword arguments of the forward that are tensors with the batch size as first dimension
    are repeated along with stacked views; everything else passes unchanged (a non-batch tensor whose first dimension
    happens to equal the batch size would be repeated too: pass it another way). The merged output has the model's
    output dtype; uncertainty measures are in the accumulation dtype (float32 at least). Transforms act on the last
    two dimensions as ``(H, W)``: a 4-D input that looks channel-last (last dimension 1, 3 or 4, dim 1 larger than
    4) gets a warning.

    Raises:
        ValueError: for an unknown name or a value out of range, arguments that contradict each other, and an
            argument that cannot act given the others (named with the reason and what would make it act).
        TypeError: for a ``stop`` that is not a stopping rule, and the keywords that moved to the task objects.
    """

    @refuse_moved
    def __init__(
        self,
        transforms: TransformSpec = "hflip",
        merge: str = "mean",
        task: TaskSpec = "classification",
        space: str | None = None,
        activation: str = "softmax",
        uncertainty: bool | str | Sequence[str] | None = None,
        chunk_size: int | str | None = "auto",
        stop: StoppingRule | None = None,
        min_views: int = 1,
        anytime: bool = False,
        return_views: bool = False,
    ) -> None:
        self.task = resolve_task(task)
        check_choice("merge", merge, MERGES)
        check_choice("activation", activation, ACTIVATIONS)
        if space is not None:
            check_choice("space", space, SPACES)
        self.transforms = resolve_transforms(transforms)
        self.task.check_transforms(self.transforms)
        self._check_merge(merge, space, activation)
        self.views = expand(self.transforms)
        self.task.check_views(self.views, transforms)
        if chunk_size not in (None, "auto"):
            check_int("chunk_size", chunk_size, 1)
        self.merge, self.activation = merge, activation
        self.space = space or default_space(merge)
        self.uncertainty = _uncertainty(uncertainty, self.task)
        self.chunk_size = chunk_size
        self._needs_classes = self._check_activation()
        self._setting = f"merge={self.merge!r}, space={self.space!r}, uncertainty={self.uncertainty}"
        if len(self.views) == 1:
            self._check_single_view(transforms)
        self._plans: dict[tuple[Size, int | None], list[list[View]]] = {}
        check_int("min_views", min_views, 1)
        check_bool("anytime", anytime)
        check_bool("return_views", return_views)
        self.stop, self.min_views, self.anytime, self.return_views = stop, min_views, anytime, return_views
        self.stats = HaltingStats()
        self._warned_layout = False
        self._check_stop()

    def _check_merge(self, merge: str, space: str | None, activation: str) -> None:
        """Refuse merges and spaces the task's outputs or the activation cannot give."""
        if not self.task.classes and (merge == "vote" or space in ("prob", "logprob")):
            bad = "merge='vote'" if merge == "vote" else f"space={space!r}"
            raise ValueError(
                f"{bad} needs class outputs; task={self.task.name!r} outputs coordinates. Use space='raw'."
            )
        if merge == "vote" and (activation != "softmax" or space not in (None, "prob")):
            raise ValueError(
                f"merge='vote' counts argmax votes over softmax classes: it needs activation='softmax' and space None "
                f"or 'prob'; got activation={activation!r}, space={space!r}."
            )
        if merge in ("gmean", "tsharpen") and space == "logprob":
            raise ValueError(f"merge={merge!r} is undefined on log-probabilities (negative); use space='prob'.")

    def _check_activation(self) -> bool:
        """Refuse an activation nothing uses; return whether the outputs must hold softmax classes along dim 1."""
        class_measures = any(name != "std" for name in self.uncertainty)
        if self.space == "raw" and not class_measures:
            why = (
                "it maps outputs to probabilities for space 'prob'/'logprob' and the uncertainty measures entropy, "
                f"mutual_info and agreement, and space='raw' with uncertainty={self.uncertainty or None!r} uses none"
            )
            check_unused(
                "activation", self.activation, "softmax", why, "Set space='prob' or a class uncertainty measure"
            )
        return self.activation == "softmax" and (self.merge == "vote" or self.space != "raw" or class_measures)

    def _check_single_view(self, transforms: TransformSpec) -> None:
        """Refuse the merges and the chunking that cannot act on a single view."""
        one = f"transforms={transforms!r} gives a single view"
        if self.merge in ("sum", "max", "min", "median", "gmean"):
            why = f"{one}, and merge={self.merge!r} of one output equals merge='mean' in the same `space`"
            check_unused("merge", self.merge, "mean", why, "Use several views, or `space` to change the output's space")
        why = f"{one}, which is always one forward"
        check_unused("chunk_size", self.chunk_size, "auto", why, "Use several views or drop it")

    def _check_stop(self) -> None:
        """Refuse the adaptive options without ``stop``, and the combinations ``stop`` cannot act in."""
        stop, min_views = self.stop, self.min_views
        if stop is None:
            if self.anytime or self.return_views:
                raise ValueError("`anytime` and `return_views` need a stopping rule: pass `stop`.")
            why = "it is the number of views every sample gets before `stop` is asked, and stop=None"
            check_unused("min_views", min_views, 1, why, "Pass a stopping rule as `stop` or drop it")
            return
        if not isinstance(stop, StoppingRule):
            raise TypeError(f"`stop` must be a ttc_lightning.stopping rule; got {type(stop).__name__}.")
        if min_views > len(self.views):
            raise ValueError(f"`min_views`={min_views} exceeds the {len(self.views)} views of `transforms`.")
        if min_views == len(self.views) and not self.anytime:
            raise ValueError(
                f"`stop`={stop!r} has no effect: min_views={min_views} is the number of views of `transforms`, so "
                "every sample gets every view before the rule is asked. Use a smaller `min_views` (or more views), "
                "or drop stop."
            )
        why = "with `stop` the views run one at a time (one forward per view on the samples still running)"
        check_unused("chunk_size", self.chunk_size, "auto", why, "Drop chunk_size, or drop stop to stack views")
        if self.merge == "median":
            raise ValueError("`stop` cannot be combined with merge='median' (it keeps every view); pick another.")
        if stop.uses_classes and not self.task.sample_classes:
            raise ValueError(
                f"`stop`={stop!r} decides on class probabilities and needs task='classification'; got "
                f"task={self.task.name!r}. Converged(tol) works on any output."
            )

    def __len__(self) -> int:
        return len(self.views)

    def plan(self, size: Size, chunk_size: int | None) -> list[list[View]]:
        """Views grouped by augmented shape (first-seen order) and cut into chunks; checks every view first."""
        key = (size, chunk_size)
        if key not in self._plans:
            groups: dict[Size, list[View]] = {}
            for view in self.views:
                view.check(size)
                groups.setdefault(view.sizes(size)[-1], []).append(view)
            step = chunk_size or len(self.views)
            self._plans[key] = [group[i : i + step] for group in groups.values() for i in range(0, len(group), step)]
        return self._plans[key]

    def __call__(self, forward: Callable[..., Any], x: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, dict]:
        """Merged output of ``forward`` over the views of ``x`` and the requested uncertainty measures."""
        return self.apply(forward, x, args, kwargs)

    def apply(
        self, forward: Callable[..., Any], x: Tensor, args: tuple, kwargs: dict, batch_dependent: bool = False
    ) -> tuple[Tensor, dict]:
        """:meth:`__call__` with the forward's arguments as a tuple and a dict; ``batch_dependent`` says whether
        ``forward`` depends on the batch (``chunk_size="auto"`` then stacks the same views on every device)."""
        size = self._input_size(x)
        if self.stop is not None:
            return self._adaptive(forward, x, size, args, kwargs)
        chunk = self.chunk_size
        if chunk == "auto":
            chunk = BATCH_DEPENDENT_CHUNK if batch_dependent else auto_chunk_size(x.device)
        batch = x.shape[0]
        merger = Merger(self.merge, self.space, self.activation)
        tracker = UncertaintyAccumulator(self.uncertainty, self.space, self.activation) if self.uncertainty else None
        out_dtype: torch.dtype | None = None
        reference: tuple[int, ...] | None = None
        for views in self.plan(size, chunk):  # type: ignore[arg-type]
            k = len(views)
            inputs = torch.cat([view.augment(x) for view in views]) if k > 1 else views[0].augment(x)
            extra = [repeat_batch_first(a, batch, k) for a in args]
            named = {name: repeat_batch_first(v, batch, k) for name, v in kwargs.items()}
            ys = forward(inputs, *extra, **named)
            if not isinstance(ys, Tensor) or ys.ndim == 0 or ys.shape[0] != k * batch:
                got = f"shape {tuple(ys.shape)}" if isinstance(ys, Tensor) else type(ys).__name__
                raise ValueError(
                    f"Test-time augmentation needs a batch-first tensor output with {k * batch} rows ({k} views x "
                    f"batch {batch}); the model returned {got}."
                )
            out_dtype = out_dtype or ys.dtype
            values = ys.to(torch.promote_types(ys.dtype, torch.float32)).unflatten(0, (k, batch))
            outputs = [self._deaugment(view, values[j], size) for j, view in enumerate(views)]
            stacked = outputs[0].unsqueeze(0) if k == 1 else torch.stack(outputs)
            if reference is None:
                reference = tuple(stacked.shape[1:])
            elif tuple(stacked.shape[1:]) != reference:
                raise ValueError(
                    f"View {views[0]} de-augments to shape {tuple(stacked.shape[1:])} but the first view gave "
                    f"{reference}; the outputs cannot be merged."
                )
            merger.add(stacked)
            if tracker is not None:
                tracker.add(stacked)
        merged = merger.result()
        extras = tracker.result(merged) if tracker is not None else {}
        return merged.to(out_dtype), extras

    def _input_size(self, x: Any) -> Size:
        """The spatial size ``(H, W)`` of an input the views can apply to (``(1, 1)`` for views that move no pixel)."""
        if not isinstance(x, Tensor):
            raise TypeError(
                f"Test-time augmentation needs a tensor input; got {type(x).__name__}. A step that calls self(batch) "
                "passes the whole batch: call self(x) with the input tensor, or inherit ttc.TestTimeComputeMixin, "
                "whose predict_step takes the input from the batch."
            )
        spatial = any(view.spatial for view in self.views)
        if x.ndim < 3 and spatial:
            raise ValueError(
                f"`transforms` {self.transforms} move pixels and need an image batch (B, ..., H, W) with at least "
                f"3 dimensions; got an input of shape {tuple(x.shape)}."
            )
        if spatial and x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] > 4 and not self._warned_layout:
            self._warned_layout = True
            rank_zero_warn(
                f"Test-time augmentation got an input of shape {tuple(x.shape)}, which looks channel-last "
                "(B, H, W, C); transforms act on the last two dimensions as (H, W). Permute the input to (B, C, H, W)."
            )
        return tuple(x.shape[-2:]) if x.ndim >= 3 else (1, 1)  # type: ignore[return-value]

    def _adaptive(
        self, forward: Callable[..., Any], x: Tensor, size: Size, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Tensor, dict]:
        """Views one at a time on the samples still running, until each sample's rule holds."""
        for view in self.views:
            view.check(size)

        def draw(iteration: int, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            view = self.views[iteration - 1]
            y = forward(view.augment(x), *args, **kwargs)
            if not isinstance(y, Tensor) or y.ndim == 0 or y.shape[0] != x.shape[0]:
                got = f"shape {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
                raise ValueError(f"Test-time augmentation needs a batch-first tensor output; the model returned {got}.")
            return self._deaugment(view, y, size)

        merger = Merger(self.merge, self.space, self.activation)
        tracker = UncertaintyAccumulator(self.uncertainty, self.space, self.activation) if self.uncertainty else None
        draws = Draws(draw, x, args, kwargs, merger, tracker)
        (merged, extras), views = halt(
            draws, len(x), self.stop, len(self.views), self.min_views, anytime=self.anytime, stats=self.stats
        )
        return merged, {**extras, "views": views} if self.return_views else extras

    def _deaugment(self, view: View, y: Tensor, size: Size) -> Tensor:
        """Map one view's output back to the input's frame, for the task."""
        self.task.check_output(y, self._needs_classes, self._setting)
        return self.task.deaugment(view, y, size)
