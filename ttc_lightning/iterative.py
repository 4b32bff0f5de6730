"""``IterativeInference``: repeated inference with per-sample halting, as a Lightning callback."""

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd
from typing_extensions import override

from ttc_lightning.callback import TestTimeCallback
from ttc_lightning.checks import check_bool, check_choice, check_int, check_unused
from ttc_lightning.halting import Draws, HaltingStats, halt, put_rows, select_rows, tree_map
from ttc_lightning.ops.augmix import RandomAugment
from ttc_lightning.ops.merge import SPACES, Merger
from ttc_lightning.ops.seeding import seeded_generator
from ttc_lightning.pipeline import Forward, Inner, Output, Run, Step, values
from ttc_lightning.stopping import StoppingRule

MODES = ("refine", "sample")


class _Refinement:
    """The :class:`~ttc_lightning.halting.Stepper` of refinement: ``(output, state) = refine(x, state)``."""

    def __init__(self, refine: Callable[..., Any], x: Tensor, args: tuple, kwargs: dict, state: Any) -> None:
        self.refine, self.batch = refine, len(x)
        self.running: tuple[Tensor, tuple, dict, Any] = (x, args, kwargs, state)
        self.positions = torch.arange(len(x))
        self.output: Tensor | None = None
        self.final_state: Any = None

    def step(self, iteration: int) -> Tensor:
        x, args, kwargs, state = self.running
        result = self.refine(x, state, *args, **kwargs)
        if not isinstance(result, tuple) or len(result) != 2 or not isinstance(result[0], Tensor):
            got = f"Tensor of shape {tuple(result.shape)}" if isinstance(result, Tensor) else type(result).__name__
            raise TypeError(f"ttc_refine(x, state) must return (output, state) with a tensor output; got {got}.")
        output, state = result
        if output.ndim == 0 or output.shape[0] != len(x):
            raise ValueError(f"ttc_refine returned an output of shape {tuple(output.shape)} for {len(x)} samples.")
        self.running, self.output = (x, args, kwargs, state), output
        return output

    def keep(self, index: Tensor) -> None:
        dropped = torch.ones(len(self.positions), dtype=torch.bool)
        dropped[index.cpu()] = False
        self._store(dropped.nonzero().squeeze(1))
        self.running = select_rows(self.running, index, len(self.positions))
        self.output = select_rows(self.output, index, len(self.positions))
        self.positions = self.positions.index_select(0, index.cpu())

    def result(self, index: Tensor) -> Tensor:
        assert self.output is not None
        return self.output.index_select(0, index)

    def finish(self) -> Any:
        """The state each sample halted with, detached, in batch order."""
        self._store(torch.arange(len(self.positions)))
        return self.final_state

    def _store(self, rows: Tensor) -> None:
        state = tree_map(Tensor.detach, select_rows(self.running[3], rows, len(self.positions)))
        if self.final_state is None:
            self.final_state = tree_map(lambda v: v.new_zeros((self.batch, *v.shape[1:])), state)
        self.final_state = put_rows(self.final_state, self.positions.index_select(0, rows), state)


class IterativeInference(TestTimeCallback):
    """Repeats inference on each sample until its stopping rule holds, removing halted samples from the batch.

    The samples pushed through the model add up to the sum of per-sample iterations (active-set compaction), where
    other systems run a batch until its slowest sample converges or keep computing masked samples. For a model whose
    per-sample output does not depend on its batch (no batch statistics), each sample's output and iteration count
    equal what it gets alone.

    Modes:

    * ``refine``: the module's ``ttc_init(x, *args, **kwargs) -> state`` and
      ``ttc_refine(x, state, *args, **kwargs) -> (output, state)`` (recurrent refinement, fixed-point / DEQ-style
      models, denoisers); ``state`` is a tensor or a tuple/list/dict of batch-first tensors. The prediction is the
      last output (or the best-scoring one with ``anytime``).
    * ``sample``: stochastic forward passes, with the model's dropout layers active (only they; everything else
      stays in eval mode) and/or inputs drawn through ``augment``. The prediction is the running mean of the draws
      in ``space``: with ``prob``, the log of the mean probability, so it is still a valid logit tensor.

    Composition: adaptation wraps iterative inference, which wraps augmentation (``sample`` mode only: each draw is
    then a merged augmented forward; the inner strategy's extras are dropped).

    Args:
        mode: ``refine`` or ``sample``. Default ``"sample"``.
        stop: a :mod:`~ttc_lightning.stopping` rule decided per sample after each iteration, or ``None`` to run
            every sample ``max_iters`` times. Default ``None``.
        max_iters: the most iterations per sample. Default ``10``.
        min_iters: iterations every sample gets before ``stop`` is asked (needs ``stop``; below ``max_iters``
            unless ``anytime``, or the rule could never act). Default ``1``.
        space: ``sample`` mode: average probabilities (``prob``), log-probabilities (``logprob``) or raw outputs
            (``raw``, e.g. for regression); refused in ``refine`` mode. Default ``"prob"``.
        augment: ``sample`` mode: a callable drawing a random view of an input batch, such as
            :class:`~ttc_lightning.RandomAugment`. Default ``None`` (dropout alone).
        warm_start: ``refine`` mode: start each sample from the state sample ``i`` of the previous batch halted
            with, when that batch had the same size and came from the same dataloader (streams of similar batches,
            such as video frames); otherwise from ``ttc_init``. Default ``False``.
        anytime: return each sample's output at its best-scoring iteration (by the rule's score) instead of its
            last; needs ``stop``. Default ``False``.
        return_iterations: add each sample's iteration count as the extra ``iterations``. Default ``False``.
        seed: ``sample`` mode: base seed of the draws (dropout and anything ``augment`` draws from torch's global
            generator); each process uses ``seed + rank``, each stage starts again from it, and the global random state
            is left untouched. Refused in ``refine`` mode, and at the start of the stage for a model without dropout
            whose ``augment`` is a :class:`~ttc_lightning.RandomAugment` (seed that instead). Default ``0``.
        stages: Trainer stages to act in, from ``predict``, ``test``, ``validate``. Default ``("predict",)``.

    Figures in the progress bar and the logger, and summarised at the end: ``iterations`` (mean per sample),
    ``saved`` (fraction of forward samples saved vs ``max_iters`` each), ``halted/<rule>`` (fraction of samples
    each rule stopped) and ``halted/max_iters`` (samples that ran out of iterations).

    Raises:
        ValueError: for an unknown ``mode``, ``space`` or ``stages``, counts below 1 or ``min_iters > max_iters``,
            a non-callable ``augment`` or one outside ``sample`` mode, non-bool flags, and arguments that cannot act
            given the others (``warm_start`` outside ``refine``, ``anytime`` without ``stop``, ``space``/``seed`` in
            ``refine`` mode, ``min_iters`` without ``stop``, a ``stop`` that ``min_iters == max_iters`` silences). At
            the start of a stage: ``sample`` mode on a model without dropout and no ``augment``, a ``seed`` that
            cannot act, and ``refine`` mode with test-time augmentation inside.
        TypeError: for a ``stop`` that is not a stopping rule; at the start of a stage, ``refine`` mode on a model
            without ``ttc_init``/``ttc_refine``.

    Example::

        from ttc_lightning import stopping

        mc_dropout = ttc.IterativeInference(
            mode="sample", stop=stopping.BetaVote(0.95) | stopping.Confidence(0.99), max_iters=16
        )
        trainer = L.Trainer(callbacks=[mc_dropout])
        logits = trainer.predict(model, dataloaders=loader)
    """

    role: ClassVar[str] = "iterative"

    def __init__(
        self,
        mode: str = "sample",
        stop: StoppingRule | None = None,
        max_iters: int = 10,
        min_iters: int = 1,
        space: str = "prob",
        augment: Callable[[Tensor], Tensor] | None = None,
        warm_start: bool = False,
        anytime: bool = False,
        return_iterations: bool = False,
        seed: int = 0,
        stages: Sequence[str] = ("predict",),
    ) -> None:
        super().__init__(stages=stages)
        check_choice("mode", mode, MODES)
        check_choice("space", space, SPACES)
        if stop is not None and not isinstance(stop, StoppingRule):
            raise TypeError(f"`stop` must be a ttc_lightning.stopping rule or None; got {type(stop).__name__}.")
        check_int("max_iters", max_iters, 1)
        check_int("min_iters", min_iters, 1)
        if min_iters > max_iters:
            raise ValueError(f"`min_iters`={min_iters} must not exceed `max_iters`={max_iters}.")
        if augment is not None and (mode != "sample" or not callable(augment)):
            raise ValueError(f"`augment` must be a callable and needs mode='sample'; got {augment!r}, mode={mode!r}.")
        for flag, value in (("warm_start", warm_start), ("anytime", anytime), ("return_iterations", return_iterations)):
            check_bool(flag, value)
        if warm_start and mode != "refine":
            raise ValueError(f"`warm_start` needs mode='refine'; got mode={mode!r}.")
        if anytime and stop is None:
            raise ValueError("`anytime` ranks iterations by the stopping rule's score: pass `stop`.")
        check_int("seed", seed, 0)
        if mode == "refine":
            why = "mode='refine' calls ttc_refine deterministically: it averages no draws and draws no random numbers"
            check_unused("space", space, "prob", why, "Use mode='sample' or drop it")
            check_unused("seed", seed, 0, why, "Use mode='sample' or drop it")
        if stop is None:
            why = "it is the number of iterations every sample gets before `stop` is asked, and stop=None"
            check_unused("min_iters", min_iters, 1, why, "Pass a stopping rule as `stop` or drop it")
        elif min_iters == max_iters and not anytime:
            raise ValueError(
                f"`stop`={stop!r} has no effect: min_iters={min_iters} equals max_iters, so every sample runs "
                "max_iters iterations before the rule is asked. Use min_iters < max_iters, or drop stop."
            )
        self.mode, self.stop, self.max_iters, self.min_iters = mode, stop, max_iters, min_iters
        self.space, self.augment, self.warm_start, self.anytime = space, augment, warm_start, anytime
        self.return_iterations, self.seed = return_iterations, seed
        self.stats = HaltingStats()
        self._run: Run | None = None

    @override
    def figures(self) -> dict[str, float]:
        return self.stats.figures()

    @override
    def start(self, run: Run) -> None:
        self.stats = HaltingStats()
        self._run, module = run, run.module
        if self.mode == "refine":
            missing = [name for name in ("ttc_init", "ttc_refine") if not callable(getattr(module, name, None))]
            if missing:
                raise TypeError(
                    f"mode='refine' needs {type(module).__name__} to define ttc_init(x) -> state and "
                    f"ttc_refine(x, state) -> (output, state); missing: {', '.join(missing)}."
                )
            return
        self._dropouts = [m for m in module.modules() if isinstance(m, _DropoutNd) and m.p > 0]
        if self.augment is None and not self._dropouts:
            raise ValueError(
                f"mode='sample' needs randomness, but {type(module).__name__} has no dropout layer with p > 0 "
                "and no `augment` was given. Pass augment=ttc.RandomAugment() or use a model with dropout."
            )
        if self.seed != 0 and not self._dropouts and isinstance(self.augment, RandomAugment):
            raise ValueError(
                f"`seed`={self.seed} has no effect: it seeds dropout and draws from torch's global generator, and "
                f"{type(module).__name__} has no dropout while `augment` (a RandomAugment) draws from its own "
                "generator. Seed the augmentation instead (RandomAugment(seed=...)), or drop seed."
            )
        self._generator = seeded_generator(self.seed, per_rank=True)
        reseed = getattr(self.augment, "reseed", None)
        if callable(reseed):
            reseed()

    @override
    def wrap(self, inner: Inner) -> Step:
        if self.mode == "sample":
            return self._sample(values(inner.forward))
        if inner.composed:
            raise ValueError(
                "mode='refine' calls ttc_refine, not forward, so test-time augmentation cannot run inside it. Use "
                "mode='sample' with TestTimeAugmentation, or drop one of the two callbacks."
            )
        return self._refine()

    @override
    def finish(self) -> None:
        self._run = None

    def _halt(self, stepper: Any, batch: int, running: bool) -> Output:
        output, iterations = halt(
            stepper, batch, self.stop, self.max_iters, self.min_iters, running, self.anytime, self.stats
        )
        return Output(output, {"iterations": iterations} if self.return_iterations else {})

    def _refine(self) -> Step:
        assert self._run is not None
        run, module = self._run, self._run.module
        warm: dict[str, Any] = {}

        def step(x: Tensor, *args: Any, **kwargs: Any) -> Output:
            _check_input(x)
            previous = warm.get("state") if warm.get("key") == (len(x), run.dataloader_idx) else None
            state = previous if previous is not None else module.ttc_init(x, *args, **kwargs)
            stepper = _Refinement(module.ttc_refine, x, args, kwargs, state)
            output = self._halt(stepper, len(x), False)
            if self.warm_start:
                warm.update(key=(len(x), run.dataloader_idx), state=stepper.finish())
            return output

        return step

    def _sample(self, inner: Forward) -> Step:
        """Draws through ``inner`` (the extras of the strategies inside are dropped)."""
        generator, dropouts = self._generator, self._dropouts

        def draw(iteration: int, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            y = inner(self.augment(x) if self.augment is not None else x, *args, **kwargs)
            classes = self.space != "raw"
            if not isinstance(y, Tensor) or y.ndim < (2 if classes else 1) or y.shape[0] != len(x):
                got = f"shape {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
                need = "class logits (B, C)" if classes else "a batch-first tensor"
                raise ValueError(
                    f"IterativeInference(mode='sample', space={self.space!r}) needs {need} with {len(x)} rows from "
                    f"each draw; the model returned {got}."
                )
            return y

        def step(x: Tensor, *args: Any, **kwargs: Any) -> Output:
            _check_input(x)
            seed = int(torch.randint(2**62, (1,), generator=generator))
            devices = [x.device] if x.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), _dropout_active(dropouts):
                torch.manual_seed(seed)
                draws = Draws(draw, x, args, kwargs, Merger("mean", self.space, "softmax"))
                output = self._halt(draws, len(x), True)
            return Output(output.value[0], output.extras)

        return step


def _check_input(x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(
            f"Iterative inference needs a tensor input; got {type(x).__name__}. A step that passes the whole batch to "
            "forward gives a tuple or list: call `self(x)` on the input, or inherit `ttc.TestTimeComputeMixin`."
        )


@contextlib.contextmanager
def _dropout_active(layers: list[nn.Module]) -> Iterator[None]:
    """Dropout layers in train mode for the block, then back in their modes."""
    modes = [layer.training for layer in layers]
    for layer in layers:
        layer.train()
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes, strict=True):
            layer.train(mode)
