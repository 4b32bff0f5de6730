"""The composed forward: strategies ordered by role wrap the module's ``forward`` once per run.

Roles, outermost first: ``adaptation``, ``iterative``, ``augmentation``. Each strategy turns the forward it wraps
into a new one; the result replaces ``module.forward`` (an instance attribute, so both ``self(x)`` and the mixin's
``predict_step`` go through it) until :func:`uninstall` removes it.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

Forward = Callable[..., Any]
#: Roles from outermost to innermost.
ROLES = ("adaptation", "iterative", "augmentation")


@dataclass
class Context:
    """What strategies share during a run: the module, its own forward, the extras of the latest call, the current
    dataloader, and the clean-ups to run when the forward is uninstalled (last registered first)."""

    module: nn.Module
    base: Forward
    #: The module's own ``forward`` instance attribute before the run (e.g. Lightning's compiled forward), if any.
    previous: Forward | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    calls: int = 0
    dataloader_idx: int = 0
    cleanups: list[Callable[[], None]] = field(default_factory=list)


class Strategy(Protocol):
    """A test-time strategy: a role and a way to wrap a forward."""

    role: str

    def wrap(self, inner: Forward, context: Context) -> Forward: ...


class ComposedForward:
    """The installed forward: counts top-level calls and resets the extras before each."""

    def __init__(self, forward: Forward, context: Context) -> None:
        self.forward, self.context = forward, context

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.context.calls += 1
        self.context.extras.clear()
        return self.forward(*args, **kwargs)


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


def install(module: nn.Module, strategies: Sequence[Strategy]) -> Context:
    """Wrap ``module.forward`` with ``strategies`` (innermost role first) and return the run's context."""
    check_roles(strategies)
    if isinstance(module.__dict__.get("forward"), ComposedForward):
        raise RuntimeError(f"{type(module).__name__}.forward is already wrapped by ttc-lightning strategies.")
    context = Context(module=module, base=module.forward, previous=module.__dict__.get("forward"))
    forward = context.base
    try:
        for strategy in sorted(strategies, key=lambda s: ROLES.index(s.role), reverse=True):
            forward = strategy.wrap(forward, context)
    except BaseException:
        _clean_up(context)  # a strategy that failed to start leaves nothing installed
        raise
    module.forward = ComposedForward(forward, context)  # type: ignore[method-assign]
    return context


def _clean_up(context: Context) -> None:
    while context.cleanups:
        context.cleanups.pop()()


def uninstall(module: nn.Module) -> None:
    """Remove the composed forward, if any, restoring the module's own (an instance attribute such as Lightning's
    compiled forward included), and run the strategies' clean-ups."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, ComposedForward):
        if forward.context.previous is None:
            del module.forward
        else:
            module.forward = forward.context.previous  # type: ignore[method-assign]
        _clean_up(forward.context)


def current_extras(module: nn.Module) -> dict[str, Tensor]:
    """A copy of the extras (uncertainty, ...) produced by the latest call of the module's composed forward."""
    forward = module.__dict__.get("forward")
    return dict(forward.context.extras) if isinstance(forward, ComposedForward) else {}
