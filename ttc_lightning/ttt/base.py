"""``TestTimeTraining``: adapt a model to the test stream inside ``trainer.predict`` (and, on request, test)."""

import inspect
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from ttc_lightning.callback import TestTimeCallback
from ttc_lightning.checks import check_bool, check_choice, check_int, check_range, check_unused, is_default
from ttc_lightning.pipeline import Forward, Inner, Output, Run, Step
from ttc_lightning.state import ModuleSnapshot
from ttc_lightning.ttt.norm import NormStatistics
from ttc_lightning.ttt.objectives import Loss, Objective, as_loss, resolve_objective
from ttc_lightning.ttt.params import ParamSpec, check_params, select_parameters
from ttc_lightning.ttt.sync import average_gradients, distributed, status

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
RESETS = ("never", "batch", "dataloader")
CLIP_MODES = ("norm", "value")
#: Smoothing of the loss average that collapse detection watches (SAR's 0.9).
COLLAPSE_SMOOTHING = 0.9
#: Why the statistics weights cannot act in a preset whose BatchNorm layers use the batch's own statistics.
BATCH_STATISTICS = {
    "norm_alpha": "it weighs the source statistics of norm='mix', and the preset normalises with the batch's own "
    "statistics (norm='batch')",
    "norm_momentum": "it weighs each batch in the running statistics of norm='ema', and the preset normalises with the "
    "batch's own statistics (norm='batch')",
}


class TestTimeTraining(TestTimeCallback):
    """Adapts chosen parameters of the model on each test batch by minimising an unsupervised objective.

    Per batch: forward, loss, backward, optimizer step, zero grad, repeated ``steps`` times; the batch's prediction
    is the output of the last forward, computed before the last update (TENT). Composed with test-time augmentation,
    the loss stays on the model's own forward and the prediction is the augmented-and-merged forward of the adapted
    model (one extra forward). Without an ``optimizer`` nothing is trained: only the normalisation statistics adapt.

    After the Trainer stage (or an exception) the model is restored bitwise unless ``keep_adapted=True``. Across
    processes (DDP) each rank adapts on its own shard of the data.

    Args:
        optimizer: a factory ``params -> torch.optim.Optimizer`` (``functools.partial(torch.optim.Adam, lr=1e-3)``,
            Hydra ``_partial_: true``), or ``None`` for statistics-only adaptation (``objective``, ``params``,
            ``steps``, ``scheduler``, ``clip_grad``, ``clip_mode``, ``tol``, ``reset_on_collapse``,
            ``reset_on_nonfinite``, ``sync`` and ``flags`` must then keep their defaults; presets that take gradient
            steps refuse ``None``). Default ``None``.
        objective: ``"entropy"`` (mean prediction entropy, TENT) or a callable ``output -> scalar tensor`` (or
            :class:`~ttc_lightning.ttt.objectives.Loss`). Default ``"entropy"``.
        params: which parameters adapt (see :func:`~ttc_lightning.ttt.params.select_parameters`): ``"batchnorm"``
            (affine parameters of the BatchNorm family), ``"groupnorm"``, ``"layernorm"``, ``"instancenorm"``,
            ``"norm"``, ``"all"``, a module type, ``"re:<pattern>"``, or a list. Default ``"batchnorm"``.
        norm: BatchNorm statistics policy: ``"batch"``, ``"source"`` (needs an ``optimizer``: alone it changes
            nothing), ``"mix"``, ``"ema"`` (see :mod:`~ttc_lightning.ttt.norm`). With an ``optimizer``, a policy or
            weight other than the default is refused at the start of a stage on a model without BatchNorm running
            statistics. Default ``"batch"``.
        norm_alpha: source weight for ``norm="mix"`` (refused with another ``norm``). Default ``0.5``.
        norm_momentum: batch weight for ``norm="ema"`` (refused with another ``norm``). Default ``0.1``.
        steps: updates per batch. Default ``1``.
        scheduler: a factory ``optimizer -> LR scheduler``, built with each optimizer and stepped after every update
            (a warm-up such as ``LinearLR`` sets the first update's rate, so it acts even when each optimizer takes one
            update). Default ``None``.
        clip_grad: gradient clipping threshold, or ``None``. Default ``None``.
        clip_mode: ``"norm"`` (total L2 norm of the adapted parameters) or ``"value"``; needs ``clip_grad``.
            Default ``"norm"``.
        tol: stop a batch's steps early when the loss changes by less than ``tol`` between steps; needs
            ``steps >= 3`` (the earliest it can spare a step is after the second). Default ``None``.
        reset: when to restore the source model and a fresh optimizer: ``"never"`` (continual within the stage),
            ``"batch"`` (episodic), ``"dataloader"`` (at each new dataloader of the stage; refused at the start of a
            stage with one dataloader), or an int ``N`` (every ``N`` updates; needs an ``optimizer``). Without an
            ``optimizer`` only ``norm="ema"`` has state to reset. Default ``"never"``.
        reset_on_collapse: reset when the running average (smoothing 0.9) of the loss falls below this value
            (collapse of the predictions to one class drives the entropy to zero; SAR uses 0.2); refused with
            ``reset="batch"`` or ``1``, which reset anyway. Default ``None``.
        reset_on_nonfinite: also reset before the next batch after a non-finite loss or gradient (the update itself is
            always skipped); refused with ``reset="batch"``. Default ``False``.
        keep_adapted: keep the adapted parameters after the stage instead of restoring the source model (without an
            ``optimizer``, only ``norm="ema"`` changes the model). Default ``False``.
        save_every_n_batches: write the adaptation state (:meth:`state_dict`) to ``save_path`` every N batches, so
            an interrupted online adaptation can resume. Default ``None`` (never).
        save_path: the file (its folder is created); ``{rank}`` in it is replaced by the process rank (required with
            several processes); needs ``save_every_n_batches``. Default ``None``.
        sync: keep the processes of a multi-process run in step: every update averages the gradients of all ranks
            (weighted by their samples in the loss) and every data-dependent decision is all-reduced, so the adapted
            parameters stay identical across ranks; ranks that run out of batches keep answering until all are done
            (see :mod:`~ttc_lightning.ttt.sync`). Needs an ``optimizer``; refused at the start of a stage that runs
            on one process. Default ``False``: each rank adapts on its own shard.
        resume_from: a file written by ``save_every_n_batches``: the stage starts from that state instead of the
            source model. Feed it the stream from sample :attr:`samples_seen` of the saved state on (see the README's
            resume recipe) to get the predictions of an uninterrupted run. Default ``None``.
        flags: add per-sample flags to the step's extras (the mixin's predict_step then returns
            ``{"prediction": ..., "kept": ..., "skipped": ...}``): ``kept``, whether the sample entered the loss of the
            batch's last step (all true without filters); ``skipped``, whether the batch's update was skipped for a
            non-finite loss or gradient. Needs an ``optimizer``. Default ``False``.
        stages: Trainer stages to act in, from ``predict``, ``test``, ``validate``. Default ``("predict",)``.

    Precision: adaptation runs inside ``predict_step``, so ``bf16-mixed`` and ``16-mixed`` autocast apply to its
    forward passes; under ``16-mixed`` (GPU) a private ``torch.amp.GradScaler`` scales the loss. Parameters held in
    half precision (``*-true`` precisions) are refused at the start of the stage.

    A batch whose loss or gradients are not finite is not used for an update (the model is untouched) and counted in
    :attr:`skipped`. Figures of the stage so far: :attr:`last_loss`, :attr:`updates`, :attr:`resets`,
    :attr:`skipped`, :attr:`backwards` (backward passes), :attr:`kept_fraction` (filtering objectives).

    An argument that cannot act given the others (or, for ``sync`` and ``reset="dataloader"``, given the run) is
    refused by name with a ``ValueError`` saying why and what would make it act; a value equal to the default is never
    refused.

    Presets change the step through :meth:`prepare`, :meth:`loss`, :meth:`apply_gradients`, :meth:`after_update`,
    :meth:`predict`, :meth:`reset_state`, :meth:`extra_state` and :meth:`load_extra_state`.
    """

    role: ClassVar[str] = "adaptation"
    #: :class:`TestTimeTraining` arguments a preset sets itself (its ``**options`` may not contain them).
    fixed_options: ClassVar[tuple[str, ...]] = ()
    #: :class:`TestTimeTraining` arguments that cannot act in a preset, each with the reason (refused like
    #: :attr:`fixed_options`).
    unused_options: ClassVar[dict[str, str]] = {}
    #: Whether the preset adapts by gradient steps, so that ``optimizer=None`` is an error.
    requires_optimizer: ClassVar[bool] = False
    #: Whether a batch's prediction comes from a forward before its last update (TENT) when nothing is composed
    #: inside; then an episodic run with one step per batch predicts with the source model only.
    predicts_before_update: ClassVar[bool] = True

    @classmethod
    def shared_options(cls) -> tuple[str, ...]:
        """The :class:`TestTimeTraining` arguments a preset takes through ``**options``: those it neither names in
        its own signature, nor sets itself, nor leaves without effect."""
        own = inspect.signature(cls.__init__).parameters
        base = inspect.signature(TestTimeTraining.__init__).parameters
        refused = {*cls.fixed_options, *cls.unused_options}
        return tuple(name for name in base if name != "self" and name not in own and name not in refused)

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Raise ``TypeError`` for a preset option that is not a shared :class:`TestTimeTraining` argument (an
        option without effect in the preset passes at its default value, as signature-driven parsers such as
        LightningCLI give every argument)."""
        base = inspect.signature(TestTimeTraining.__init__).parameters
        bad = [
            name
            for name in options
            if name not in cls.shared_options()
            and not (name in cls.unused_options and is_default(options[name], base[name].default))
        ]
        if bad:
            reasons = "".join(
                f" `{name}` has no effect in {cls.__name__}: {cls.unused_options[name]}."
                for name in bad
                if name in cls.unused_options
            )
            raise TypeError(
                f"{cls.__name__} got unexpected option(s) {', '.join(map(repr, bad))}; it sets "
                f"{', '.join(cls.fixed_options) or 'nothing'} itself and accepts its own arguments plus "
                f"{', '.join(cls.shared_options())}.{reasons}"
            )

    def __init__(
        self,
        optimizer: OptimizerFactory | None = None,
        objective: str | Objective = "entropy",
        params: ParamSpec = "batchnorm",
        norm: str = "batch",
        norm_alpha: float = 0.5,
        norm_momentum: float = 0.1,
        steps: int = 1,
        scheduler: SchedulerFactory | None = None,
        clip_grad: float | None = None,
        clip_mode: str = "norm",
        tol: float | None = None,
        reset: str | int = "never",
        reset_on_collapse: float | None = None,
        reset_on_nonfinite: bool = False,
        keep_adapted: bool = False,
        save_every_n_batches: int | None = None,
        save_path: str | None = None,
        resume_from: str | None = None,
        sync: bool = False,
        flags: bool = False,
        stages: Sequence[str] = ("predict",),
    ) -> None:
        super().__init__(stages=stages)
        if save_every_n_batches is not None:
            check_int("save_every_n_batches", save_every_n_batches, 1)
            if not save_path:
                raise ValueError(f"`save_every_n_batches`={save_every_n_batches} needs a `save_path`.")
        for name, path in (("save_path", save_path), ("resume_from", resume_from)):
            if path is not None and not isinstance(path, str | os.PathLike):
                raise TypeError(f"`{name}`={path!r} must be a file name (a str or path) or None.")
        self.save_every_n_batches, self.save_path, self.resume_from = save_every_n_batches, save_path, resume_from
        for name, flag in (("reset_on_nonfinite", reset_on_nonfinite), ("keep_adapted", keep_adapted)):
            check_bool(name, flag)
        self.sync, self.flags = check_bool("sync", sync), check_bool("flags", flags)
        if optimizer is not None and not callable(optimizer):
            raise TypeError(
                f"`optimizer` must be a factory params -> Optimizer (functools.partial); got {optimizer!r}."
            )
        if optimizer is None and self.requires_optimizer:
            raise ValueError(
                f"`optimizer`=None: {type(self).__name__} adapts by gradient steps and needs an optimizer factory "
                "(functools.partial(torch.optim.SGD, lr=...)); for statistics-only adaptation use ttc.BatchNormAdapt."
            )
        if scheduler is not None and not callable(scheduler):
            raise TypeError(f"`scheduler` must be a factory optimizer -> LR scheduler or None; got {scheduler!r}.")
        self.steps = check_int("steps", steps, 1)
        if isinstance(reset, str):
            check_choice("reset", reset, RESETS)
        else:
            check_int("reset", reset, 1)
        check_choice("clip_mode", clip_mode, CLIP_MODES)
        for name, value in (("clip_grad", clip_grad), ("tol", tol), ("reset_on_collapse", reset_on_collapse)):
            if value is not None and (isinstance(value, bool) or not (isinstance(value, int | float) and value >= 0)):
                raise ValueError(f"`{name}`={value!r} must be a non-negative number or None.")
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.objective = resolve_objective(objective)
        check_params(params)
        if optimizer is None:
            gradient_options = {
                "objective": objective != "entropy",
                "params": params != "batchnorm",
                "steps": steps != 1,
                "scheduler": scheduler is not None,
                "clip_grad": clip_grad is not None,
                "clip_mode": clip_mode != "norm",
                "tol": tol is not None,
                "reset_on_collapse": reset_on_collapse is not None,
                "reset_on_nonfinite": reset_on_nonfinite,
                "sync": sync,
                "flags": flags,
            }
            unused = [f"`{name}`" for name, given in gradient_options.items() if given]
            if unused:
                raise ValueError(
                    f"{', '.join(unused)} set without an `optimizer`: nothing is trained then (only the BatchNorm "
                    f"statistics adapt), so {', '.join(gradient_options)} are unused. Pass an `optimizer` or drop them."
                )
        self.params = params
        check_range("norm_alpha", norm_alpha, 0, 1)
        check_range("norm_momentum", norm_momentum, 0, 1, low_open=True)
        self.norm = NormStatistics(norm, norm_alpha, norm_momentum)
        #: The statistics arguments given other than their defaults, as the user spelt them (presets that fix the
        #: policy name theirs), refused at the start of a stage on a model without BatchNorm running statistics.
        self.norm_arguments = {
            name: value
            for name, value, default in (
                ("norm", norm, "batch"),
                ("norm_alpha", norm_alpha, 0.5),
                ("norm_momentum", norm_momentum, 0.1),
            )
            if not is_default(value, default)
        }
        _check_combinations(
            trains=optimizer is not None,
            norm=norm,
            norm_alpha=norm_alpha,
            norm_momentum=norm_momentum,
            steps=steps,
            clip_grad=clip_grad,
            clip_mode=clip_mode,
            tol=tol,
            reset=reset,
            reset_on_collapse=reset_on_collapse,
            reset_on_nonfinite=reset_on_nonfinite,
            keep_adapted=keep_adapted,
            save_every_n_batches=save_every_n_batches,
            save_path=save_path,
            resume_from=resume_from,
        )
        self.clip_grad, self.clip_mode, self.tol = clip_grad, clip_mode, tol
        self.reset_policy, self.reset_on_collapse = reset, reset_on_collapse
        self.reset_on_nonfinite = reset_on_nonfinite
        self.keep_adapted = keep_adapted
        self.needs_grad = optimizer is not None
        self.modifies_model = not keep_adapted
        self.needs_source = True
        self._batch_statistics = False
        self._source: ModuleSnapshot | None = None
        self._clear_figures()

    def figures(self) -> dict[str, float]:
        if self.optimizer_factory is None:  # statistics only: nothing to report
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
        self.last_loss = math.nan
        self.updates = self.resets = self.skipped = self.backwards = 0
        self.kept_fraction = math.nan
        self.samples_seen = self.batches_seen = self._batch_size = 0
        self._loss_average: float | None = None
        self._updates_since_reset = self._batches_since_reset = 0
        self._last_dataloader: int | None = None
        self._diverged = False

    @property
    @override
    def batch_dependent(self) -> bool:
        return self._batch_statistics

    @override
    def start(self, run: Run) -> None:
        self._undo_norm: Callable[[], None] | None = None
        self._source = None
        module = run.module
        self._check_run(run)
        self._clear_figures()
        self._undo_norm = self.norm.apply(module, required=self.optimizer_factory is None)
        self._batch_statistics = self.norm.policy != "source" and _running_statistics(module)
        self._params: list[nn.Parameter] = []
        if self.optimizer_factory is not None:
            chosen = select_parameters(module, self.params)
            low = sorted(name for name, p in chosen.items() if p.dtype in (torch.float16, torch.bfloat16))
            if low:
                raise ValueError(
                    f"Test-time training cannot update low-precision parameters ({low[0]} is "
                    f"{chosen[low[0]].dtype}); use precision='bf16-mixed' or '16-mixed' instead of a '-true' one."
                )
            module.requires_grad_(False)
            self._params = [p.requires_grad_(True) for p in chosen.values()]
        self._module, self._run = module, run
        self._synced = self.sync and self.optimizer_factory is not None and distributed()
        self._template: tuple[Tensor, list, dict] | None = None
        self._scaler = grad_scaler(run.precision, self._params)
        if run.source is None:
            raise RuntimeError(f"{type(self).__name__} needs the stage's snapshot of the model (Run.source).")
        self._source = run.source.values()  # the state resets return to
        self._new_optimizer()

    @override
    def wrap(self, inner: Inner) -> Step:
        self._check_composition(inner.composed)
        self._model = inner.model
        self.prepare(inner.model)
        if self.resume_from is not None:
            self.load_state_dict(torch.load(self.resume_from, map_location="cpu", weights_only=False))

        def step(x: Tensor, *args: Any, **kwargs: Any) -> Output:
            self._maybe_reset()
            self._batches_since_reset += 1
            self.batches_seen += 1
            self.samples_seen += len(x)
            self._batch_size = len(x)
            if self._synced:
                status(True, x, self._params[0].device)
                self._template = (x[:0], [a[:0] if _rows(a, len(x)) else a for a in args], kwargs)
            if isinstance(x, Tensor) and x.is_inference():
                x = x.clone()
            if self.optimizer_factory is None:
                with torch.no_grad():
                    return inner.forward(x, *args, **kwargs)
            skipped_before = self.skipped
            with torch.enable_grad():
                output, kept = self._adapt(inner.model, x, args, kwargs)
            prediction = self.predict(inner, x, args, kwargs, output)
            if not self.flags:
                return prediction
            batch = len(x)
            flags = {
                "kept": torch.ones(batch, dtype=torch.bool) if kept is None else kept.cpu(),
                "skipped": torch.full((batch,), self.skipped > skipped_before),
            }
            return Output(prediction.value, {**flags, **prediction.extras})

        return step

    @override
    def finish(self) -> None:
        self._source = None  # no reset, state or save outside the stage
        undo, self._undo_norm = getattr(self, "_undo_norm", None), None
        if undo is not None:
            undo()

    def _check_composition(self, composed: bool) -> None:
        """Refuse, at the start of the stage, an episodic single update whose prediction would never see it
        (``composed``: a strategy runs inside this one, whose forward then gives the prediction)."""
        one_update = self.optimizer_factory is not None and self.steps == 1 and self.reset_policy in ("batch", 1)
        if one_update and self.predicts_before_update and not composed and not self.keep_adapted:
            raise ValueError(
                f"`reset`={self.reset_policy!r} (`episodic`=True in a preset) with steps=1 leaves the `optimizer` "
                f"without effect: {type(self).__name__} predicts each batch from its forward before the batch's "
                "only update, and the model is reset to the source before every batch, so no update ever "
                "reaches a prediction (they are the source model's). Use steps >= 2, compose a strategy that "
                "predicts with the adapted model (TestTimeAugmentation), keep_adapted=True to keep the last "
                "batch's adaptation, or ttc.BatchNormAdapt."
            )

    def _check_run(self, run: Run) -> None:
        """Refuse, at the start of the stage, the arguments that the run leaves without effect."""
        if self.sync and not distributed():
            raise ValueError(
                "`sync`=True has no effect: it keeps the processes of a multi-process run in step, and this run has "
                "one process. Run on several devices (e.g. strategy='ddp') or drop it."
            )
        module = run.module
        if self.norm_arguments and not _running_statistics(module) and self.optimizer_factory is not None:
            given = ", ".join(f"`{name}`={value!r}" for name, value in self.norm_arguments.items())
            raise ValueError(
                f"{given} has no effect: the statistics policy acts on BatchNorm layers with running statistics, and "
                f"{type(module).__name__} has none. Drop it, or use a model with BatchNorm."
            )
        trainer, stage = run.trainer, run.stage
        if self.reset_policy == "dataloader" and trainer is not None:
            name = {"predict": "num_predict_batches", "test": "num_test_batches", "validate": "num_val_batches"}
            loaders = len(getattr(trainer, name[stage])) if stage in name else 0
            if loaders == 1:
                raise ValueError(
                    f"`reset`='dataloader' has no effect: it resets when a new {stage} dataloader starts, and this run "
                    "has one. Pass several dataloaders, or use reset='batch' or 'never'."
                )

    def _new_optimizer(self) -> None:
        self._optimizer = self._scheduler = None
        if self.optimizer_factory is None:
            return
        try:
            self._optimizer = self.optimizer_factory(self._params)
        except Exception as error:
            raise ValueError(
                f"`optimizer` factory {self.optimizer_factory!r} failed on the {len(self._params)} adapted "
                f"parameters: {error}"
            ) from error
        if not isinstance(self._optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` factory returned {type(self._optimizer).__name__}, not a torch Optimizer.")
        if self.scheduler_factory is not None:
            self._scheduler = self.scheduler_factory(self._optimizer)

    def _adapt(self, forward: Forward, x: Tensor, args: tuple, kwargs: dict) -> tuple[Any, Tensor | None]:
        """``steps`` updates on the batch; returns the output :meth:`loss` returned last, detached, and the samples
        its loss kept (``None`` without filters)."""
        previous = None
        for _ in range(self.steps):
            loss, output = self.loss(forward, x, args, kwargs)
            if loss.kept is not None and len(loss.kept):
                self.kept_fraction = loss.kept.float().mean().item()
            value = self._step(loss, lambda: self.loss(forward, x, args, kwargs)[0])
            self.last_loss = value
            if self.tol is not None and previous is not None and abs(previous - value) < self.tol:
                break
            previous = value
        return (output.detach() if isinstance(output, Tensor) else output), loss.kept

    def _step(self, loss: Loss, recompute: Callable[[], Loss]) -> float:
        """Backward, check, clip, step; returns the loss value the update used (NaN when skipped)."""
        assert self._optimizer is not None
        value = self.apply_gradients(loss, recompute)
        if value is None:  # nothing to learn from, a non-finite loss, or the preset decided against an update
            self._optimizer.zero_grad(set_to_none=True)
            return math.nan
        if self._scaler is not None:
            self._scaler.unscale_(self._optimizer)
        grads = [p.grad for p in self._params if p.grad is not None]
        if grads and not all(torch.isfinite(g).all() for g in grads):
            if self._scaler is not None:  # an fp16 overflow: lower the scale, as GradScaler.step would
                self._scaler.update()
            self._skip("gradients")
            return math.nan
        if self.clip_grad is not None:
            clip = nn.utils.clip_grad_norm_ if self.clip_mode == "norm" else nn.utils.clip_grad_value_
            clip(self._params, self.clip_grad)
        if self._scaler is None:
            self._optimizer.step()
        else:
            self._scaler.step(self._optimizer)
            self._scaler.update()
        self._optimizer.zero_grad(set_to_none=True)
        if self._scheduler is not None:
            self._scheduler.step()
        self.updates += 1
        self._updates_since_reset += 1
        self._loss_average = (
            value
            if self._loss_average is None
            else COLLAPSE_SMOOTHING * self._loss_average + (1 - COLLAPSE_SMOOTHING) * value
        )
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
        value = loss.value.detach().item()
        finite = math.isfinite(value)
        weight = float(loss.kept.sum()) if loss.kept is not None else float(self._batch_size)
        if finite and weight > 0:
            if not loss.value.requires_grad:
                raise ValueError(
                    "The test-time objective returned a loss without a gradient: it must be computed from the model's "
                    "output without detaching it, and `params` must select parameters that output depends on."
                )
            self.backwards += 1
            (loss.value if self._scaler is None else self._scaler.scale(loss.value)).backward()
        if self._synced:
            average, bad = average_gradients(self._params, weight, value, bad=not finite and weight > 0)
            if bad:
                self._skip("loss")
            return average
        if weight == 0:  # no sample passed the filters: nothing to learn from
            return None
        if not finite:
            self._skip("loss")
            return None
        return value

    def prepare(self, model: Forward) -> None:
        """Set the preset's own state up at the start of a stage (after parameter selection, before resuming);
        ``model`` is the model's own forward."""

    def after_update(self) -> None:
        """Called after every optimizer step (teacher updates, stochastic restore)."""

    def predict(self, inner: Inner, x: Tensor, args: tuple, kwargs: dict, output: Any) -> Output:
        """The batch's prediction after adaptation: ``output`` alone when nothing is composed inside, else the inner
        strategies' forward (e.g. test-time augmentation) of the adapted model, with their extras."""
        if not inner.composed:
            return Output(output)
        with torch.no_grad():
            return inner.forward(x, *args, **kwargs)

    def reset_state(self) -> None:
        """Clear the preset's own state on :meth:`reset` (moving averages, teachers)."""

    def _skip(self, what: str) -> None:
        assert self._optimizer is not None
        self._optimizer.zero_grad(set_to_none=True)
        if self.skipped == 0:
            rank_zero_warn(
                f"{type(self).__name__}: non-finite {what} on a batch; skipped its update (model untouched)."
            )
        self.skipped += 1
        self._diverged = self.reset_on_nonfinite

    def _maybe_reset(self) -> None:
        policy = self.reset_policy
        loader = self._run.dataloader_idx
        new_loader = self._last_dataloader is not None and loader != self._last_dataloader
        self._last_dataloader = loader
        due = (
            (policy == "batch" and self._batches_since_reset > 0)
            or (policy == "dataloader" and new_loader)
            or (isinstance(policy, int) and self._updates_since_reset >= policy)
            or self._diverged
            or (
                self.reset_on_collapse is not None
                and self._loss_average is not None
                and self._loss_average < self.reset_on_collapse
            )
        )
        if due:
            self.reset()

    def reset(self) -> None:
        """Restore the model to the state it had when this stage started and start a fresh optimizer.

        Only during a stage (between its start and end); outside one there is nothing adapted to reset.
        """
        if self._source is None:
            raise RuntimeError(f"{type(self).__name__}.reset() works during a Trainer stage in which it adapts.")
        self._source.restore(self._module)
        self._new_optimizer()
        self._updates_since_reset = self._batches_since_reset = 0
        self._loss_average = None
        self._diverged = False
        self.reset_state()
        self.resets += 1

    def state_dict(self) -> dict[str, Any]:
        """The full adaptation state during a stage (empty outside one): the model's parameters and buffers, the
        source state, the optimizer and scheduler, the preset's own state, the random state and the counters."""
        if self._source is None or self._source.tensors is None:
            return {}
        counters = ("updates", "resets", "skipped", "backwards", "samples_seen", "batches_seen")
        return {
            "preset": type(self).__name__,
            "model": {k: v.detach().clone() for k, v in self._module.state_dict().items()},
            "source": self._source.tensors,
            "optimizer": None if self._optimizer is None else self._optimizer.state_dict(),
            "scheduler": None if self._scheduler is None else self._scheduler.state_dict(),
            "extra": self.extra_state(),
            "counters": {name: getattr(self, name) for name in counters},
            "since_reset": (self._updates_since_reset, self._batches_since_reset, self._loss_average),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (during a stage; an empty state, as saved outside one, is ignored)."""
        if not state:
            return
        if not isinstance(state, dict) or "preset" not in state:
            got = f"a dict with keys {sorted(map(str, state))}" if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"{type(self).__name__} cannot resume from {got}: not an adaptation state written by "
                "`save_every_n_batches` or state_dict(). Check `resume_from`."
            )
        if state["preset"] != type(self).__name__:
            raise ValueError(f"The adaptation state was saved by {state['preset']}, not {type(self).__name__}.")
        self._module.load_state_dict(state["model"])
        assert self._source.tensors is not None
        self._source.tensors.update(state["source"])
        if self._optimizer is not None:
            self._optimizer.load_state_dict(state["optimizer"])
        if self._scheduler is not None:
            self._scheduler.load_state_dict(state["scheduler"])
        self.load_extra_state(state["extra"])
        for name, value in state["counters"].items():
            setattr(self, name, value)
        self._updates_since_reset, self._batches_since_reset, self._loss_average = state["since_reset"]
        torch.set_rng_state(state["torch_rng"])

    def extra_state(self) -> dict[str, Any]:
        """The preset's own state to save (moving averages, teachers, random generators)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    def _drain(self) -> None:
        """With ``sync``: answer the other ranks' collectives on empty batches until no rank has data left."""
        if not getattr(self, "_synced", False) or self._source is None:
            return
        device = self._params[0].device
        while True:
            ranks, shape = status(False, None, device)
            if ranks == 0:
                return
            x, args, kwargs = self._template or (torch.zeros((0, *shape), device=device), [], {})
            self._batch_size = 0
            with torch.enable_grad():
                self._adapt(self._model, x, tuple(args), kwargs)

    @override
    def epoch_end(self, run: Run) -> None:
        self._drain()

    def _save(self, run: Run) -> None:
        every = self.save_every_n_batches
        if every is None or self._source is None or self.batches_seen == 0 or self.batches_seen % every:
            return
        assert self.save_path is not None
        if run.world_size > 1 and "{rank}" not in os.fspath(self.save_path):
            raise ValueError(f"`save_path`={self.save_path!r} needs a '{{rank}}' placeholder with several processes.")
        path = os.fspath(self.save_path).replace("{rank}", str(run.rank))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(self.state_dict(), path)

    @override
    def batch_end(self, run: Run) -> None:
        self._save(run)


def _check_combinations(
    *,
    trains: bool,
    norm: str,
    norm_alpha: float,
    norm_momentum: float,
    steps: int,
    clip_grad: float | None,
    clip_mode: str,
    tol: float | None,
    reset: str | int,
    reset_on_collapse: float | None,
    reset_on_nonfinite: bool,
    keep_adapted: bool,
    save_every_n_batches: int | None,
    save_path: str | None,
    resume_from: str | None,
) -> None:
    """Refuse the :class:`TestTimeTraining` arguments that cannot act given the others (``trains``: an optimizer
    was given), each by name with why it has no effect and what would make it act. Values equal to the defaults are
    never refused."""
    if norm != "mix":
        why = f"it is the weight of the source statistics of norm='mix', and norm={norm!r}"
        check_unused("norm_alpha", norm_alpha, 0.5, why, "Set norm='mix' or drop it")
    if norm != "ema":
        why = f"it is the weight of each batch in the running statistics of norm='ema', and norm={norm!r}"
        check_unused("norm_momentum", norm_momentum, 0.1, why, "Set norm='ema' or drop it")
    if clip_grad is None:
        why = "it says how `clip_grad` clips the gradients, and clip_grad=None"
        check_unused("clip_mode", clip_mode, "norm", why, "Set `clip_grad` or drop it")
    if steps < 3:
        why = (
            "it ends a batch's steps when the loss changed by less than tol between two steps, which can first "
            f"spare a step after the second one, and steps={steps}"
        )
        check_unused("tol", tol, None, why, "Use steps >= 3 or drop it")
    if reset == "batch" or reset == 1:
        when = "before every batch" if reset == "batch" else "after every update"
        kind = " (episodic)" if reset == "batch" else ""
        why = f"reset={reset!r}{kind} already resets {when}, which a collapse reset cannot add to"
        remedy = "Use reset='never' (episodic=False in a preset) or an N > 1 to let the loss average build up"
        check_unused("reset_on_collapse", reset_on_collapse, None, why, remedy)
    if reset == "batch":
        why = "reset='batch' (episodic) already resets before every batch, non-finite ones included"
        remedy = "Use another reset (episodic=False in a preset) or drop it"
        check_unused("reset_on_nonfinite", reset_on_nonfinite, False, why, remedy)
    if save_every_n_batches is None:
        why = "it is where `save_every_n_batches` writes the adaptation state, and save_every_n_batches=None"
        check_unused("save_path", save_path, None, why, "Set `save_every_n_batches` or drop it")
    if trains:
        return
    if norm == "source":
        why = "without an `optimizer` nothing is trained, and the source statistics are what the model uses anyway"
        check_unused("norm", norm, "batch", why, "Use norm 'batch', 'mix' or 'ema', or pass an `optimizer`")
    if isinstance(reset, int):
        why = "reset=N counts optimizer updates, and without an `optimizer` there are none"
        check_unused("reset", reset, "never", why, "Use reset='batch' or 'dataloader', or pass an `optimizer`")
    if norm != "ema":
        why = (
            f"without an `optimizer` and with norm={norm!r} the model never changes (the statistics are computed per "
            "batch and never stored), so there is nothing to keep, reset, save or resume"
        )
        remedy = "Use norm='ema' (running statistics that carry over from batch to batch) or pass an `optimizer`"
        check_unused("keep_adapted", keep_adapted, False, why, remedy)
        check_unused("reset", reset, "never", why, remedy)
        check_unused("save_every_n_batches", save_every_n_batches, None, why, remedy)
        check_unused("resume_from", resume_from, None, why, remedy)


def _rows(value: Any, batch: int) -> bool:
    return isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == batch


def _running_statistics(module: nn.Module) -> bool:
    """Whether ``module`` has a BatchNorm layer with running statistics (what the statistics policies act on)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None for m in module.modules())


def grad_scaler(precision: str, params: list[nn.Parameter]) -> "torch.amp.GradScaler | None":
    """A private gradient scaler under ``precision="16-mixed"`` (Lightning's own scaler is only stepped in fit)."""
    if not params or precision != "16-mixed":
        return None
    return torch.amp.GradScaler(params[0].device.type)
