"""``TestTimeCallback``: the Lightning side shared by every strategy (stages, run lifecycle, restoration)."""

from collections.abc import Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from ttc_lightning.checks import check_trainer
from ttc_lightning.lightning_internals import inference_mode, set_inference_mode
from ttc_lightning.pipeline import ComposedForward, Inner, Run, Step, check_roles, install, uninstall
from ttc_lightning.progress import show, summarise
from ttc_lightning.state import ModuleSnapshot

#: Trainer stages a strategy can act in.
STAGES = ("predict", "test", "validate")
#: Lightning strategies that shard the model across processes: refused (strategies need the whole model per process).
SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def check_strategy(trainer: pl.Trainer) -> None:
    """Raise ``RuntimeError`` for a Lightning strategy that shards the model."""
    names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
    sharded = [name for name in SHARDED if name in names]
    if sharded:
        raise RuntimeError(
            f"ttc-lightning strategies need the whole model on every process, but the Trainer uses {sharded[0]}, "
            "which shards parameters (adaptation changes and restores them; views and iterations call the full "
            "forward). Use strategy='ddp' (or one device): test-time compute is data-parallel."
        )


class _Stage:
    """One Trainer stage with strategies applied: the stage's snapshot, the installed forward, the per-batch checks."""

    def __init__(
        self, strategies: Sequence["TestTimeCallback"], trainer: pl.Trainer, module: pl.LightningModule, stage: str
    ) -> None:
        check_roles(strategies)
        self.strategies, self.trainer = strategies, trainer
        # The stage's one snapshot: modes and flags now (before the loop's eval()), tensors at the stage's start.
        self.snapshot = ModuleSnapshot.capture(module, tensors=False)
        # Gradient strategies need the loop out of inference mode; set before the loop runs, restored by finish().
        self.stage, self.batches = stage, 0
        self.inference_mode = inference_mode(trainer, stage)
        if any(s.needs_grad for s in strategies):
            set_inference_mode(trainer, stage, False)
        self.run: Run | None = None
        self.installed: ComposedForward | None = None
        self.warned = False

    def start(self, module: pl.LightningModule) -> None:
        """Add the model's tensors to the stage's snapshot (after any ``ckpt_path`` was loaded) where a strategy
        changes them or needs them, and install the pipeline."""
        if any(s.modifies_model or s.needs_source for s in self.strategies):
            self.snapshot = self.snapshot.with_tensors(module)
        trainer = self.trainer
        self.run = Run(
            module=module,
            trainer=trainer,
            stage=self.stage,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            precision=str(trainer.precision),
            source=self.snapshot if self.snapshot.tensors is not None else None,
        )
        self.installed = install(self.run, self.strategies)

    def batch_start(self, dataloader_idx: int) -> None:
        if self.run is not None:
            self.run.dataloader_idx = dataloader_idx

    def epoch_end(self) -> None:
        if self.run is not None and self.installed is not None:
            for strategy in self.strategies:
                strategy.epoch_end(self.run)

    def batch_end(self, module: pl.LightningModule, batch_idx: int) -> None:
        """Check the batch called the composed forward; report the strategies' figures."""
        if self.run is None or self.installed is None:
            return
        self.batches += 1
        calls, self.installed.calls = self.installed.calls, 0
        if calls == 0:
            raise RuntimeError(
                f"Batch {batch_idx}: the step never called {type(module).__name__}.forward, so no test-time strategy "
                "ran. Call `self(x)` in the step (not a submodule such as `self.net(x)`), or inherit "
                "`ttc_lightning.TestTimeComputeMixin` to get a predict_step that does."
            )
        if calls > 1 and not self.warned:
            self.warned = True
            rank_zero_warn(
                f"Batch {batch_idx}: the step called {type(module).__name__}.forward {calls} times; test-time "
                "strategies ran on every call (once per batch is expected)."
            )
        figures = {f"{s.name}/{key}": value for s in self.strategies for key, value in s.figures().items()}
        show(self.trainer, self.stage, figures, self.batches)
        for strategy in self.strategies:
            strategy.batch_end(self.run)

    def finish(self, module: pl.LightningModule) -> None:
        """Remove the pipeline and restore the model and the loop (also when a strategy's ``finish`` raises)."""
        try:
            if self.installed is not None:  # never remove a forward this stage did not install
                uninstall(module)
                for strategy in self.strategies:
                    summarise(type(strategy).__name__, strategy.figures())
        finally:
            self.snapshot.restore(module, tensors=any(s.modifies_model for s in self.strategies))
            set_inference_mode(self.trainer, self.stage, self.inference_mode)


class TestTimeCallback(Callback):
    """Base class of test-time strategies as Lightning callbacks.

    All strategy callbacks of one Trainer stage form one pipeline, ordered by role (adaptation outermost, iterative
    inference in the middle, augmentation innermost), installed at the stage's start and removed at its end or on
    an exception, when the module's parameters, buffers, modes and ``requires_grad`` flags are restored to what they
    were before the stage (after any ``ckpt_path`` was loaded).

    A strategy implements the life cycle of :mod:`ttc_lightning.pipeline`: :meth:`start` (set-up for the stage),
    :meth:`wrap` (the strategy's step around the forward it is handed), :meth:`batch_end`, :meth:`epoch_end` and
    :meth:`finish` (undo the set-up, also after an exception), and declares :attr:`batch_dependent`,
    :attr:`modifies_model`, :attr:`needs_source` and :attr:`needs_grad`.

    Args:
        stages: Trainer stages to act in, a subset of ``("predict", "test", "validate")``. Default ``("predict",)``.
            ``validate`` means ``trainer.validate``; validation inside ``trainer.fit`` is never touched.

    Raises:
        ValueError: for ``stages`` that are not a non-empty list drawn from the three; at the start of a stage, for
            two strategies of one role or an unknown role.
        TypeError: at the start of a stage, for a Trainer of the separate ``pytorch_lightning`` package.
        RuntimeError: at the start of a stage, for a Lightning strategy that shards the model (FSDP, DeepSpeed).
    """

    __test__ = False  # not a pytest test class despite the name
    role: ClassVar[str]
    #: Whether the strategy changes parameters or buffers that must be restored at the end of the stage.
    modifies_model: bool = False
    #: Whether the strategy needs the stage's snapshot of the model (``run.source``, e.g. to reset to it).
    needs_source: bool = False
    #: Whether the strategy needs autograd (the Trainer's loop then runs without inference mode).
    needs_grad: bool = False

    def __init__(self, stages: Sequence[str] = ("predict",)) -> None:
        if isinstance(stages, str) or not stages or any(s not in STAGES for s in stages):
            raise ValueError(f"`stages`={stages!r} must be a non-empty list drawn from {', '.join(STAGES)}.")
        self.stages = tuple(stages)
        self._stage: _Stage | None = None

    @property
    def batch_dependent(self) -> bool:
        """Whether, during the run, the strategy makes the model's forward depend on the batch (batch statistics);
        read after :meth:`start`."""
        return False

    def start(self, run: Run) -> None:
        """Set up for the stage ``run`` (called before :meth:`wrap`; :meth:`finish` undoes it)."""

    def wrap(self, inner: Inner) -> Step:
        """Return the step that applies this strategy around ``inner.forward``."""
        raise NotImplementedError

    def batch_end(self, run: Run) -> None:
        """Called after every batch of a stage the strategy acts in (e.g. to save state)."""

    def epoch_end(self, run: Run) -> None:
        """Called when this process has no batch left in the stage (e.g. to keep answering other processes)."""

    def finish(self) -> None:
        """Undo :meth:`start` at the end of the stage or after an exception (also after a :meth:`start` that raised
        part-way)."""

    @property
    def name(self) -> str:
        """The prefix of this strategy's figures in the progress bar and the logs."""
        return type(self).__name__.lower()

    def figures(self) -> dict[str, float]:
        """Figures of the stage so far, shown in the progress bar, logged, and summarised at the end."""
        return {}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = None
        if stage not in self.stages:
            return
        peers = [cb for cb in trainer.callbacks if isinstance(cb, TestTimeCallback) and stage in cb.stages]
        if peers[0] is self:  # the first strategy of the stage runs the pipeline for all of them
            check_trainer(trainer, type(self).__name__)
            check_strategy(trainer)
            self._stage = _Stage(peers, trainer, pl_module, stage)

    # The Lightning hooks: one per moment of the stage, shared by predict, test and validate (aliases).

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Take the stage's tensors and install the pipeline (after any ``ckpt_path`` was loaded)."""
        if self._stage is not None:
            self._stage.start(pl_module)

    on_test_start = on_validation_start = on_predict_start

    @override
    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Tell the run which dataloader the batch comes from."""
        if self._stage is not None:
            self._stage.batch_start(dataloader_idx)

    on_test_batch_start = on_validation_batch_start = on_predict_batch_start

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Check the batch called the composed forward, report the figures, call the strategies' ``batch_end``."""
        if self._stage is not None:
            self._stage.batch_end(pl_module, batch_idx)

    on_test_batch_end = on_validation_batch_end = on_predict_batch_end

    @override
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Call the strategies' ``epoch_end`` (this process has no batch left)."""
        if self._stage is not None:
            self._stage.epoch_end()

    on_test_epoch_end = on_validation_epoch_end = on_predict_epoch_end

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the pipeline, finish the strategies and restore the model and the loop."""
        stage, self._stage = self._stage, None
        if stage is not None:
            stage.finish(pl_module)

    on_test_end = on_validation_end = on_predict_end

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_predict_end(trainer, pl_module)
