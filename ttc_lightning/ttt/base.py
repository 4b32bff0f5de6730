"""``TestTimeTraining``: adapt a model to the test stream inside ``trainer.predict`` (and, on request, test).

The class composes the parts of the adaptation, one job each: parameter selection (:mod:`.params`), the
normalisation-statistics policy (:mod:`.norm`), the objective (:mod:`.objectives`), the updater (:mod:`.updater`),
the reset policy (:mod:`.resets`), model anchoring (:mod:`.anchoring`), output correction (:mod:`.correction`) and
persistence (:mod:`.persistence`); argument refusals that span parts live in :mod:`.refusals`.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from typing_extensions import override

from ttc_lightning.callback import TestTimeCallback
from ttc_lightning.checks import check_bool, check_int
from ttc_lightning.pipeline import Forward, Inner, Output, Run, Step
from ttc_lightning.state import ModuleSnapshot
from ttc_lightning.ttt.anchoring import Anchor
from ttc_lightning.ttt.correction import OutputCorrection
from ttc_lightning.ttt.norm import NormStatistics, running_statistics
from ttc_lightning.ttt.objectives import Loss, Objective, as_loss, resolve_objective
from ttc_lightning.ttt.params import ParamSpec, adapted_parameters, check_params
from ttc_lightning.ttt.persistence import Persistence, adaptation_state, load_adaptation_state
from ttc_lightning.ttt.refusals import (
    check_combinations,
    check_composition,
    check_parts,
    check_run,
    check_without_optimizer,
    refuse_moved,
)
from ttc_lightning.ttt.resets import ResetPolicy, Resets
from ttc_lightning.ttt.sync import distributed, drain, status, template
from ttc_lightning.ttt.updater import OptimizerFactory, Updater, Updates


class TestTimeTraining(TestTimeCallback):
    """Adapts chosen parameters of the model on each test batch by minimising an unsupervised objective.

    Per batch: forward, loss, backward, optimizer step, zero grad, repeated ``steps`` times; the batch's prediction
    is the output of the last forward, computed before the last update (TENT). Composed with test-time augmentation,
    the loss stays on the model's own forward and the prediction is the augmented-and-merged forward of the adapted
    model (one extra forward). Without an ``optimizer`` nothing is trained: only the normalisation statistics adapt.

    After the Trainer stage (or an exception) the model is restored bitwise unless
    ``persistence=Persistence(keep_adapted=True)``. Across processes (DDP) each rank adapts on its own shard of the
    data unless ``updates=Updates(sync=True)``.

    Args:
        optimizer: a factory ``params -> torch.optim.Optimizer`` (``functools.partial(torch.optim.Adam, lr=1e-3)``,
            Hydra ``_partial_: true``), or ``None`` for statistics-only adaptation (``objective``, ``params``,
            ``steps``, ``updates``, ``resets.on_collapse``, ``resets.on_nonfinite``, ``anchors`` and ``flags`` must
            then keep their defaults; presets that take gradient steps refuse ``None``). Default ``None``.
        objective: ``"entropy"`` (mean prediction entropy, TENT) or a callable ``output -> scalar tensor`` (or
            :class:`~ttc_lightning.ttt.objectives.Loss`, for per-sample weights and filters). Default ``"entropy"``.
        params: which parameters adapt (:func:`~ttc_lightning.ttt.params.select_parameters`). Default
            ``"batchnorm"`` (the affine parameters of the BatchNorm family).
        norm: BatchNorm statistics policy: ``"batch"``, ``"source"`` (needs an ``optimizer``: alone it changes
            nothing), ``"mix"``, ``"ema"``, or a :class:`~ttc_lightning.ttt.norm.NormStatistics` with its weights
            (``NormStatistics("mix", alpha=0.9)``). With an ``optimizer``, a policy other than the default is refused
            at the start of a stage on a model without BatchNorm running statistics. Default ``"batch"``.
        steps: updates per batch. Default ``1``.
        updates: scheduler, clipping, early stop and sync of the updates (:class:`~ttc_lightning.Updates`).
        resets: when to return to the source model (:class:`~ttc_lightning.Resets`). ``every="batch"`` with one
            step per batch is refused unless ``keep_adapted`` or a composed strategy lets an update reach a prediction.
        persistence: keep, save and resume the adaptation (:class:`~ttc_lightning.Persistence`).
        anchors: parts acting on the adapted parameters after every update (:mod:`~ttc_lightning.ttt.anchoring`).
            Default ``()``.
        correction: applied to each batch's prediction (:class:`~ttc_lightning.ttt.correction.OutputCorrection`).
            Default ``None``: the identity.
        flags: per-sample extras (the mixin's predict_step then returns ``{"prediction", "kept", "skipped"}``):
            ``kept``, whether the sample entered the loss of the batch's last step (all true without filters);
            ``skipped``, whether the batch's update was skipped (non-finite). Needs an ``optimizer``. Default ``False``.
        stages: Trainer stages to act in, from ``predict``, ``test``, ``validate``. Default ``("predict",)``.

    Raises:
        TypeError: for an argument of the wrong type (a group that is not its option object, say).
        ValueError: for a bad value, or an argument that cannot act given the others (by name, with why and what
            would make it act; a value equal to the default is never refused). ``updates.sync``,
            ``resets.every="dataloader"`` and the statistics policy are also checked against the run at the start of
            the stage.

    Precision: autocast applies to the forward passes; under ``16-mixed`` (GPU) a private ``GradScaler`` scales the
    loss; half-precision parameters (``*-true``) are refused at the start of the stage. A batch whose loss or
    gradients are not finite takes no update (the model is untouched) and is counted in :attr:`skipped`. Figures of
    the stage so far: :attr:`last_loss`, :attr:`updates`, :attr:`resets`, :attr:`skipped`, :attr:`backwards`
    (backward passes), :attr:`kept_fraction` (filtering objectives). The state to save and resume is
    :meth:`adaptation_state` (the callback's ``state_dict``, which Lightning puts into checkpoints, stays empty).

    Presets change the step through :meth:`prepare`, :meth:`loss`, :meth:`apply_gradients`, :meth:`after_update`,
    :meth:`predict`, :meth:`reset_state`, :meth:`extra_state` and :meth:`load_extra_state`.
    """

    role: ClassVar[str] = "adaptation"
    #: Whether the preset adapts by gradient steps, so that ``optimizer=None`` is an error.
    requires_optimizer: ClassVar[bool] = False
    #: Whether a batch's prediction comes from a forward before its last update (TENT) when nothing is composed
    #: inside; then an episodic run with one step per batch predicts with the source model only.
    predicts_before_update: ClassVar[bool] = True

    @refuse_moved
    def __init__(
        self,
        optimizer: OptimizerFactory | None = None,
        objective: str | Objective = "entropy",
        params: ParamSpec = "batchnorm",
        norm: str | NormStatistics = "batch",
        steps: int = 1,
        updates: Updates = Updates(),  # noqa: B008 (frozen)
        resets: Resets = Resets(),  # noqa: B008 (frozen)
        persistence: Persistence = Persistence(),  # noqa: B008 (frozen)
        anchors: Sequence[Anchor] = (),
        correction: OutputCorrection | None = None,
        flags: bool = False,
        stages: Sequence[str] = ("predict",),
    ) -> None:
        super().__init__(stages=stages)
        check_parts(updates=updates, resets=resets, persistence=persistence, anchors=anchors, correction=correction)
        if optimizer is None and self.requires_optimizer:
            raise ValueError(
                f"`optimizer`=None: {type(self).__name__} adapts by gradient steps and needs an optimizer factory "
                "(functools.partial(torch.optim.SGD, lr=...)); for statistics-only adaptation use ttc.BatchNormAdapt."
            )
        self.steps, self.flags = check_int("steps", steps, 1), check_bool("flags", flags)
        self.objective = resolve_objective(objective)
        check_params(params)
        self.params = params
        if optimizer is None:
            check_without_optimizer(objective, params, steps, updates, resets, anchors, flags)
        self.norm = NormStatistics.of(norm)
        #: The statistics arguments given other than their defaults, as the user spelt them (presets that fix the
        #: policy name theirs), refused at the start of a stage on a model without BatchNorm running statistics.
        self.norm_arguments: dict[str, Any] = {} if self.norm == NormStatistics() else {"norm": norm}
        trains = optimizer is not None
        check_combinations(
            trains=trains, norm=self.norm, steps=steps, updates=updates, resets=resets, persistence=persistence
        )
        self.optimizer_factory = optimizer
        self.updater = None if optimizer is None else Updater(optimizer, updates, type(self).__name__)
        self.resetter, self.persistence = ResetPolicy(resets), persistence
        self.anchors, self.correction = tuple(anchors), correction or OutputCorrection()
        self.needs_grad, self.modifies_model, self.needs_source = trains, not persistence.keep_adapted, True
        self._batch_statistics = False
        self._source: ModuleSnapshot | None = None
        self._clear_figures()

    @property
    def updates(self) -> int:
        """Updates taken in the stage so far."""
        return 0 if self.updater is None else self.updater.updates

    @property
    def skipped(self) -> int:
        """Updates skipped for a non-finite loss or gradients."""
        return 0 if self.updater is None else self.updater.skipped

    @property
    def backwards(self) -> int:
        """Backward passes taken."""
        return 0 if self.updater is None else self.updater.backwards

    @property
    def resets(self) -> int:
        """Resets to the source model."""
        return self.resetter.count

    @override
    def figures(self) -> dict[str, float]:
        if self.updater is None:  # statistics only: nothing to report
            return {}
        figures = {
            "loss": self.last_loss,
            "updates": self.updates,
            "backwards": self.backwards,
            "resets": self.resets,
            "skipped": self.skipped,
        }
        if not math.isnan(self.kept_fraction):
            figures["kept"] = self.kept_fraction
        return figures

    def _clear_figures(self) -> None:
        self.last_loss = self.kept_fraction = math.nan
        self.samples_seen = self.batches_seen = self._batch_size = 0
        self.resetter.clear()
        if self.updater is not None:
            self.updater.clear()

    @property
    @override
    def batch_dependent(self) -> bool:
        return self._batch_statistics

    @override
    def start(self, run: Run) -> None:
        self._undo_norm: Callable[[], None] | None = None
        self._source = None
        module = run.module
        check_run(self, run)
        self._clear_figures()
        self._undo_norm = self.norm.apply(module, required=self.updater is None)
        self._batch_statistics = self.norm.policy != "source" and bool(running_statistics(module))
        self._params = [] if self.updater is None else adapted_parameters(module, self.params)
        self._module, self._run = module, run
        self._template: tuple[Tensor, list, dict] | None = None
        if run.source is None:
            raise RuntimeError(f"{type(self).__name__} needs the stage's snapshot of the model (Run.source).")
        self._source = run.source.values()  # the state resets return to
        if self.updater is not None:
            synced = self.updater.options.sync and distributed()
            self.updater.start(self._params, grad_scaler(run.precision, self._params), synced)
        for anchor in self.anchors:
            anchor.start(self._params)
        self.correction.reset()

    @override
    def wrap(self, inner: Inner) -> Step:
        check_composition(self, inner.composed)
        self._model = inner.model
        self.prepare(inner.model)
        if self.persistence.resume_from is not None:
            self.load_adaptation_state(self.persistence.load(type(self).__name__))

        def step(x: Tensor, *args: Any, **kwargs: Any) -> Output:
            self._begin_batch(x, args, kwargs)
            if isinstance(x, Tensor) and x.is_inference():
                x = x.clone()
            if self.updater is None:
                with torch.no_grad():
                    out = inner.forward(x, *args, **kwargs)
                return Output(self.correction(out.value), out.extras)
            skipped_before = self.skipped
            with torch.enable_grad():
                output, kept = self._adapt(inner.model, x, args, kwargs)
            prediction = self.predict(inner, x, args, kwargs, output)
            extras = prediction.extras
            if self.flags:
                batch = len(x)
                flags = {
                    "kept": torch.ones(batch, dtype=torch.bool) if kept is None else kept.cpu(),
                    "skipped": torch.full((batch,), self.skipped > skipped_before),
                }
                extras = {**flags, **extras}
            return Output(self.correction(prediction.value), extras)

        return step

    @override
    def finish(self) -> None:
        self._source = None  # no reset, state or save outside the stage
        undo, self._undo_norm = getattr(self, "_undo_norm", None), None
        if undo is not None:
            undo()

    def _begin_batch(self, x: Tensor, args: tuple, kwargs: dict) -> None:
        """Reset if due; count the batch; with sync, report this rank's status and keep an empty template batch."""
        if self.resetter.due(self._run.dataloader_idx):
            self.reset()
        self.resetter.batches_since += 1
        self.batches_seen += 1
        self.samples_seen += len(x)
        self._batch_size = len(x)
        if self.updater is not None and self.updater.synced:
            status(True, x, self._params[0].device)
            self._template = template(x, args, kwargs)

    def _adapt(self, forward: Forward, x: Tensor, args: tuple, kwargs: dict) -> tuple[Any, Tensor | None]:
        """``steps`` updates on the batch; returns the output :meth:`loss` returned last, detached, and the samples
        its loss kept (``None`` without filters)."""
        previous, tol = None, self.updater.options.tol if self.updater is not None else None
        for _ in range(self.steps):
            loss, output = self.loss(forward, x, args, kwargs)
            if loss.kept is not None and len(loss.kept):
                self.kept_fraction = loss.kept.float().mean().item()
            value = self._step(loss, lambda: self.loss(forward, x, args, kwargs)[0])
            self.last_loss = value
            if tol is not None and previous is not None and abs(previous - value) < tol:
                break
            previous = value
        return (output.detach() if isinstance(output, Tensor) else output), loss.kept

    def _step(self, loss: Loss, recompute: Callable[[], Loss]) -> float:
        """Gradients, then the update; returns the loss value the update used (NaN when none was taken)."""
        assert self.updater is not None
        skipped = self.updater.skipped
        value = self.apply_gradients(loss, recompute)
        stepped = self.updater.step(value)
        if self.updater.skipped > skipped:
            self.resetter.nonfinite()
        if not stepped or value is None:
            return math.nan
        self.resetter.updated(value)
        self.after_update()
        return value

    # Extension points for presets.

    def loss(self, forward: Forward, x: Tensor, args: tuple, kwargs: dict) -> tuple[Loss, Any]:
        """One step's loss and the output the batch's prediction comes from: the objective on ``forward(x)``."""
        output = forward(x, *args, **kwargs)
        return as_loss(self.objective(output)), output

    def apply_gradients(self, loss: Loss, recompute: Callable[[], Loss]) -> float | None:
        """Fill the adapted parameters' gradients for the update; return the loss value to record, or ``None`` for
        no update.

        ``recompute`` gives the loss again at the current parameters (sharpness-aware steps perturb, then call it).
        """
        assert self.updater is not None
        return self.updater.backward(loss, self._batch_size)

    def prepare(self, model: Forward) -> None:
        """Set the preset's own state up at the start of a stage (after parameter selection and the anchors' start,
        before resuming); ``model`` is the model's own forward."""

    def after_update(self) -> None:
        """Called after every optimizer step: the anchors act on the adapted parameters."""
        for anchor in self.anchors:
            anchor.after_update(self._params)

    def predict(self, inner: Inner, x: Tensor, args: tuple, kwargs: dict, output: Any) -> Output:
        """The batch's prediction after adaptation: ``output`` alone when nothing is composed inside, else the inner
        strategies' forward (e.g. test-time augmentation) of the adapted model, with their extras."""
        if not inner.composed:
            return Output(output)
        with torch.no_grad():
            return inner.forward(x, *args, **kwargs)

    def reset_state(self) -> None:
        """Clear the preset's own state on :meth:`reset` (moving averages)."""

    def extra_state(self) -> dict[str, Any]:
        """The preset's own state to save (moving averages, random generators)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    def reset(self) -> None:
        """Restore the model to the state it had when this stage started and start a fresh optimizer.

        Only during a stage (between its start and end); outside one there is nothing adapted to reset.

        Raises:
            RuntimeError: outside a stage.
        """
        if self._source is None:
            raise RuntimeError(f"{type(self).__name__}.reset() works during a Trainer stage in which it adapts.")
        self._source.restore(self._module)
        if self.updater is not None:
            self.updater.renew()
        self.resetter.restart()
        for anchor in self.anchors:
            anchor.reset(self._params)
        self.correction.reset()
        self.reset_state()
        self.resetter.count += 1

    def adaptation_state(self) -> dict[str, Any]:
        """The full adaptation state during a stage (empty outside one; see
        :func:`~ttc_lightning.ttt.persistence.adaptation_state`)."""
        return adaptation_state(self)

    def load_adaptation_state(self, state: dict[str, Any]) -> None:
        """Continue from an :meth:`adaptation_state` (during a stage; an empty state, as saved outside one, is
        ignored).

        Raises:
            ValueError: for a state that is not an adaptation state of this class.
        """
        load_adaptation_state(self, state)

    @override
    def epoch_end(self, run: Run) -> None:
        if self.updater is None or not self.updater.synced or self._source is None:
            return

        def empty_step(x: Tensor, args: tuple, kwargs: dict) -> None:
            self._batch_size = 0
            with torch.enable_grad():
                self._adapt(self._model, x, args, kwargs)

        drain(self._params[0].device, self._template, empty_step)  # answer the other ranks until none has data

    @override
    def batch_end(self, run: Run) -> None:
        if self._source is not None and self.persistence.due(self.batches_seen):
            self.persistence.save(self.adaptation_state(), run.rank, run.world_size)


def grad_scaler(precision: str, params: list[nn.Parameter]) -> "torch.amp.GradScaler | None":
    """A private gradient scaler under ``precision="16-mixed"`` (Lightning's own scaler is only stepped in fit)."""
    if not params or precision != "16-mixed":
        return None
    return torch.amp.GradScaler(params[0].device.type)
