"""``TestTimeCallback``: the Lightning side shared by every strategy (stages, run lifecycle, restoration)."""

from collections.abc import Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from ttc_lightning.checks import check_trainer
from ttc_lightning.pipeline import Context, Forward, check_roles, install, uninstall
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


class _Run:
    """One Trainer stage with strategies applied: snapshots, the installed forward and the per-batch checks."""

    def __init__(
        self, strategies: Sequence["TestTimeCallback"], trainer: pl.Trainer, module: pl.LightningModule, stage: str
    ) -> None:
        check_roles(strategies)
        self.strategies = strategies
        self.before = ModuleSnapshot.capture(module, tensors=False)
        # Gradient strategies need the loop out of inference mode; set before the loop runs, restored by finish().
        loops = {"predict": trainer.predict_loop, "test": trainer.test_loop, "validate": trainer.validate_loop}
        self.loop, self.stage, self.batches = loops[stage], stage, 0
        self.inference_mode = self.loop.inference_mode
        if any(s.needs_grad for s in strategies):
            self.loop.inference_mode = False
        self.tensors: ModuleSnapshot | None = None
        self.context: Context | None = None
        self.warned = False

    def start(self, module: pl.LightningModule) -> None:
        if any(s.modifies_model for s in self.strategies):
            self.tensors = ModuleSnapshot.capture(module, tensors=True)
        self.context = install(module, self.strategies)

    def end_batch(self, trainer: pl.Trainer, module: pl.LightningModule, batch_idx: int) -> None:
        """Check the batch called the composed forward; report the strategies' figures."""
        assert self.context is not None
        self.batches += 1
        calls, self.context.calls = self.context.calls, 0
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
        show(trainer, self.stage, figures, self.batches)
        for strategy in self.strategies:
            strategy.after_batch(trainer)

    def finish(self, module: pl.LightningModule) -> None:
        if self.context is not None:  # never remove a forward this run did not install
            uninstall(module)
            for strategy in self.strategies:
                summarise(type(strategy).__name__, strategy.figures())
        if self.tensors is not None:
            self.tensors.restore(module)
        self.before.restore(module)
        self.loop.inference_mode = self.inference_mode


class TestTimeCallback(Callback):
    """Base class of test-time strategies as Lightning callbacks.

    All strategy callbacks of one Trainer stage form one pipeline, ordered by role (adaptation outermost, iterative
    inference in the middle, augmentation innermost), installed at the stage's start and removed at its end or on
    an exception, when the module's parameters, buffers, modes and ``requires_grad`` flags are restored to what they
    were before the stage (after any ``ckpt_path`` was loaded).

    Args:
        stages: Trainer stages to act in, a subset of ``("predict", "test", "validate")``. Default ``("predict",)``.
            ``validate`` means ``trainer.validate``; validation inside ``trainer.fit`` is never touched.
    """

    __test__ = False  # not a pytest test class despite the name
    role: ClassVar[str]
    #: Whether the strategy changes parameters or buffers (a full snapshot is then taken and restored).
    modifies_model: bool = False
    #: Whether the strategy needs autograd (the Trainer's loop then runs without inference mode).
    needs_grad: bool = False

    def __init__(self, stages: Sequence[str] = ("predict",)) -> None:
        if isinstance(stages, str) or not stages or any(s not in STAGES for s in stages):
            raise ValueError(f"`stages`={stages!r} must be a non-empty list drawn from {', '.join(STAGES)}.")
        self.stages = tuple(stages)
        self._run: _Run | None = None

    def wrap(self, inner: Forward, context: Context) -> Forward:
        """Return the forward that applies this strategy around ``inner``."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The prefix of this strategy's figures in the progress bar and the logs."""
        return type(self).__name__.lower()

    def figures(self) -> dict[str, float]:
        """Figures of the stage so far, shown in the progress bar, logged, and summarised at the end."""
        return {}

    def after_batch(self, trainer: pl.Trainer) -> None:
        """Called after every batch of a stage the strategy acts in (e.g. to save state)."""

    def end_epoch(self) -> None:
        """Called when this process has no batch left in the stage (e.g. to keep answering other processes)."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._run = None
        if stage not in self.stages:
            return
        peers = [cb for cb in trainer.callbacks if isinstance(cb, TestTimeCallback) and stage in cb.stages]
        if peers[0] is self:  # the first strategy of the stage runs the pipeline for all of them
            check_trainer(trainer, type(self).__name__)
            check_strategy(trainer)
            self._run = _Run(peers, trainer, pl_module, stage)

    def _start(self, pl_module: pl.LightningModule) -> None:
        if self._run is not None:
            self._run.start(pl_module)

    def _batch_start(self, dataloader_idx: int) -> None:
        if self._run is not None and self._run.context is not None:
            self._run.context.dataloader_idx = dataloader_idx

    def _epoch_end(self) -> None:
        if self._run is not None and self._run.context is not None:
            for strategy in self._run.strategies:
                strategy.end_epoch()

    def _batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: int) -> None:
        if self._run is not None and self._run.context is not None:
            self._run.end_batch(trainer, pl_module, batch_idx)

    def _finish(self, pl_module: pl.LightningModule) -> None:
        run, self._run = self._run, None
        if run is not None:
            run.finish(pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start(pl_module)

    @override
    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(dataloader_idx)

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(dataloader_idx)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(dataloader_idx)

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
        self._batch_end(trainer, pl_module, batch_idx)

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(trainer, pl_module, batch_idx)

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end(trainer, pl_module, batch_idx)

    @override
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end()

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end()

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish(pl_module)
