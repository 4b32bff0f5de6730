"""The composed forward: strategies ordered by role wrap the module's ``forward`` once per run.

The strategy interface (one life cycle per Trainer stage; :class:`~ttc_lightning.TestTimeCallback` implements it):

* ``start(run)``: set up what needs only the :class:`Run` (trainer, module, stage, rank, world size, precision,
  the stage's one :class:`~ttc_lightning.state.ModuleSnapshot` as ``run.source``). Called innermost role first.
* ``wrap(inner) -> step``: :class:`Inner` hands the strategy what it may use: ``inner.forward``, the composition of
  the strategies inside it; ``inner.model``, the model's own forward; ``inner.composed``, whether anything is
  composed inside; ``inner.batch_dependent``, whether the model's forward depends on the batch in this run. The
  returned step maps the forward's arguments to an :class:`Output` (value and per-call extras such as uncertainty,
  flags or iteration counts). Called innermost first, after every ``start``.
* ``batch_end(run)`` after every batch, ``epoch_end(run)`` when the process has no batch left, and ``finish()``
  (reverse order of ``start``, also after an exception, also for a strategy whose ``start`` raised part-way).
* ``batch_dependent``: whether the strategy makes the model's forward depend on the batch (batch statistics).

Roles, outermost first: ``adaptation``, ``iterative``, ``augmentation``. The composition replaces ``module.forward``
(an instance attribute, so both ``self(x)`` and the mixin's ``predict_step`` go through it) with a
:class:`ComposedForward`, which returns the value alone to ``self(x)`` callers and keeps the latest call's extras for
:func:`call` and :func:`current_extras`, until :func:`uninstall` removes it.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

from ttc_lightning.state import ModuleSnapshot

Forward = Callable[..., Any]
#: Roles from outermost to innermost.
ROLES = ("adaptation", "iterative", "augmentation")


@dataclass(frozen=True)
class Output:
    """What a wrapped forward returns: the value the model's callers see and the call's extras."""

    value: Any
    extras: dict[str, Tensor] = field(default_factory=dict)


#: A wrapped forward: the forward's arguments to an :class:`Output`.
Step = Callable[..., Output]


@dataclass
class Run:
    """One Trainer stage as strategies see it. ``source`` is the stage's one snapshot of the module, with its tensors
    as the stage started, before any strategy (``None`` when no strategy changes them or needs them);
    ``dataloader_idx`` is the current batch's dataloader."""

    module: nn.Module
    trainer: Any = None
    stage: str = "predict"
    rank: int = 0
    world_size: int = 1
    precision: str = "32-true"
    source: ModuleSnapshot | None = None
    dataloader_idx: int = 0


@dataclass(frozen=True)
class Inner:
    """What a strategy's ``wrap`` is handed (see the module docstring)."""

    forward: Step
    model: Forward
    composed: bool
    batch_dependent: bool


class Strategy(Protocol):
    """A test-time strategy: a role, a life cycle and a way to wrap a forward."""

    role: str

    @property
    def batch_dependent(self) -> bool: ...

    def start(self, run: Run) -> None: ...

    def wrap(self, inner: Inner) -> Step: ...

    def finish(self) -> None: ...


def values(step: Step) -> Forward:
    """``step`` as a plain forward: its value, the extras dropped."""
    return lambda *args, **kwargs: step(*args, **kwargs).value


def lifted(forward: Forward) -> Step:
    """``forward`` as a step without extras."""
    return lambda *args, **kwargs: Output(forward(*args, **kwargs))


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether a BatchNorm layer of ``module`` normalises with the batch's statistics (train mode, or no running
    statistics), so that a sample's output depends on the rest of its batch."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
        for m in module.modules()
    )


class ComposedForward:
    """The installed forward: counts top-level calls, returns the value, keeps the extras of the latest call."""

    def __init__(self, step: Step, strategies: Sequence[Strategy], previous: Forward | None) -> None:
        self.step, self.strategies, self.previous = step, strategies, previous
        self.calls = 0
        self.extras: dict[str, Tensor] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.extras = {}
        output = self.step(*args, **kwargs)
        self.extras = output.extras
        return output.value


def check_roles(strategies: Sequence[Strategy]) -> None:
    """Raise ``ValueError`` for an unknown role or two strategies of the same role."""
    seen: dict[str, Strategy] = {}
    for strategy in strategies:
        if strategy.role not in ROLES:
            raise ValueError(f"{type(strategy).__name__}.role={strategy.role!r}; allowed: {', '.join(ROLES)}.")
        if strategy.role in seen:
            raise ValueError(
                f"Two test-time strategies of role {strategy.role!r} in one run: {type(seen[strategy.role]).__name__} "
                f"and {type(strategy).__name__}. Use one {strategy.role} callback per Trainer stage."
            )
        seen[strategy.role] = strategy


def install(run: Run, strategies: Sequence[Strategy]) -> ComposedForward:
    """Start ``strategies`` (innermost role first), wrap ``run.module.forward`` with them and return the installed
    forward. A strategy that fails to start or wrap leaves nothing installed (the started ones are finished)."""
    check_roles(strategies)
    module = run.module
    if composed_forward(module) is not None:
        raise RuntimeError(f"{type(module).__name__}.forward is already wrapped by ttc-lightning strategies.")
    ordered = sorted(strategies, key=lambda s: ROLES.index(s.role), reverse=True)
    model, started = module.forward, []
    try:
        for strategy in ordered:
            started.append(strategy)
            strategy.start(run)
        batch_dependent = uses_batch_statistics(module) or any(s.batch_dependent for s in ordered)
        step = lifted(model)
        for depth, strategy in enumerate(ordered):
            step = strategy.wrap(Inner(step, model, depth > 0, batch_dependent))
    except BaseException:
        _finish(started)
        raise
    installed = ComposedForward(step, ordered, module.__dict__.get("forward"))
    module.forward = installed  # type: ignore[method-assign]
    return installed


def _finish(strategies: Sequence[Strategy]) -> None:
    """Finish ``strategies`` in reverse order; every one runs even if another raises (the first error is raised)."""
    error: BaseException | None = None
    for strategy in reversed(strategies):
        try:
            strategy.finish()
        except BaseException as raised:
            error = error or raised
    if error is not None:
        raise error


def uninstall(module: nn.Module) -> None:
    """Remove the composed forward, if any, restoring the module's own (an instance attribute such as Lightning's
    compiled forward included), and finish the strategies (outermost first)."""
    installed = composed_forward(module)
    if installed is not None:
        if installed.previous is None:
            del module.forward
        else:
            module.forward = installed.previous  # type: ignore[method-assign]
        _finish(installed.strategies)


def composed_forward(module: nn.Module) -> ComposedForward | None:
    """The composed forward installed on ``module``, if any: the one place that reads the instance attribute."""
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, ComposedForward) else None


def call(module: nn.Module, *args: Any, **kwargs: Any) -> Output:
    """``module(*args, **kwargs)`` (hooks included) with the extras its composed forward produced (none without)."""
    value = module(*args, **kwargs)
    return Output(value, current_extras(module))


def current_extras(module: nn.Module) -> dict[str, Tensor]:
    """A copy of the extras (uncertainty, ...) produced by the latest call of the module's composed forward."""
    installed = composed_forward(module)
    return dict(installed.extras) if installed is not None else {}
