"""Per-sample halting with active-set compaction, shared by iterative inference and adaptive augmentation.

A :class:`Stepper` runs one iteration for the samples still running; :func:`halt` evaluates the stopping rule after
each iteration, takes each halted sample's output, and removes halted samples from the stepper (and from every
batch-first tensor it holds), so the samples pushed through the model add up to the sum of per-sample iterations.
"""

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ttc_lightning.ops.merge import Merger
from ttc_lightning.ops.uncertainty import UncertaintyAccumulator
from ttc_lightning.stopping import StoppingRule, Trace

#: The name under which samples that ran ``max_iters`` without their rule holding are counted.
MAX_ITERS = "max_iters"


def tree_map(fn: Callable[..., Tensor], *trees: Any) -> Any:
    """``fn`` applied to the tensors at matching places of ``trees`` (tensors, tuples, lists, mappings of them);
    anything else in the first tree is kept."""
    first = trees[0]
    if isinstance(first, Tensor):
        return fn(*trees)
    if isinstance(first, tuple | list):
        return type(first)(tree_map(fn, *items) for items in zip(*trees, strict=True))
    if isinstance(first, Mapping):
        return type(first)({k: tree_map(fn, *(tree[k] for tree in trees)) for k in first})  # type: ignore[call-arg]
    return first


def select_rows(value: Any, index: Tensor, batch: int) -> Any:
    """``value`` with only the rows at ``index`` of every tensor in it that has ``batch`` rows (batch-first forward
    arguments, recurrent state); other values unchanged."""

    def pick(v: Tensor) -> Tensor:
        return v.index_select(0, index.to(v.device)) if v.ndim >= 1 and v.shape[0] == batch else v

    return tree_map(pick, value)


def put_rows(target: Any, index: Tensor, value: Any) -> Any:
    """``target`` with rows ``index`` replaced by ``value`` (same structure), out of place so gradients flow."""
    return tree_map(lambda t, v: t.index_copy(0, index.to(t.device), v.to(t.dtype)), target, value)


class Stepper(Protocol):
    """One iteration at a time for the samples still running."""

    def step(self, iteration: int) -> Tensor:
        """The output of iteration ``iteration`` (1-based) for the running samples, batch first."""

    def keep(self, index: Tensor) -> None:
        """Keep only the running samples at ``index`` (positions among the running ones)."""

    def result(self, index: Tensor) -> Any:
        """The final outputs of the running samples at ``index``: a batch-first tensor, or a tuple/dict of them."""


@dataclass
class HaltingStats:
    """Counts over a stage: samples, iterations, the budget ``max_iters`` per sample, and why samples halted."""

    samples: int = 0
    iterations: int = 0
    budget: int = 0
    halted: dict[str, int] = field(default_factory=dict)

    def figures(self) -> dict[str, float]:
        """Mean iterations, compute saved vs the budget, and the fraction of samples halted by each rule."""
        if not self.samples:
            return {}
        out = {"iterations": self.iterations / self.samples, "saved": 1 - self.iterations / self.budget}
        out.update({f"halted/{name}": count / self.samples for name, count in self.halted.items()})
        return out


def _class_probs(output: Tensor) -> Tensor:
    if output.ndim != 2:
        raise ValueError(
            "Stopping rules on class probabilities (all but Converged) need (B, C) class outputs; the model returned "
            f"shape {tuple(output.shape)}. Use Converged(tol) for other outputs."
        )
    return torch.softmax(output.float(), 1)


@dataclass
class _Statistics:
    """What the rules look at, for the running samples."""

    running: bool
    window: int
    prob_sum: Tensor | None = None
    votes: Tensor | None = None
    recent: Tensor | None = None
    stable: Tensor | None = None
    argmax: Tensor | None = None
    output_sum: Tensor | None = None
    estimate: Tensor | None = None

    def update(self, output: Tensor, iteration: int, classes: bool) -> Trace:
        previous, output = self.estimate, output.detach()
        if self.running:
            self.output_sum = output.float() if self.output_sum is None else self.output_sum + output
            self.estimate = self.output_sum / iteration
        else:
            self.estimate = output
        if not classes:
            return Trace(iteration, self.estimate, previous)
        p = _class_probs(output)
        vote = p.argmax(1)
        if self.prob_sum is None or self.votes is None or self.recent is None or self.stable is None:
            self.prob_sum, self.votes = torch.zeros_like(p), torch.zeros_like(p)
            self.recent = torch.full((len(p), self.window), -1, dtype=torch.long, device=p.device)
            self.stable = torch.zeros(len(p), dtype=torch.long, device=p.device)
        self.prob_sum = self.prob_sum + p if self.running else p
        mean_prob = self.prob_sum / iteration if self.running else p
        self.votes = self.votes.scatter_add(1, vote[:, None], torch.ones_like(p[:, :1]))
        self.recent = torch.cat([self.recent[:, 1:], vote[:, None]], 1)
        argmax = mean_prob.argmax(1)
        if self.argmax is not None:
            self.stable = torch.where(argmax == self.argmax, self.stable + 1, 0)
        self.argmax = argmax
        return Trace(iteration, self.estimate, previous, mean_prob, self.votes, self.recent, self.stable)

    def keep(self, index: Tensor) -> None:
        for name in ("prob_sum", "votes", "recent", "stable", "argmax", "output_sum", "estimate"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, index))


def halt(
    stepper: Stepper,
    batch: int,
    rule: StoppingRule | None,
    max_iters: int,
    min_iters: int = 1,
    running: bool = True,
    anytime: bool = False,
    stats: HaltingStats | None = None,
) -> tuple[Any, Tensor]:
    """Run ``stepper`` until each of ``batch`` samples halts; return the outputs and per-sample iteration counts.

    A sample halts after iteration ``t`` when ``t >= min_iters`` and ``rule`` holds for it, or at ``max_iters``
    (``rule=None`` runs every sample ``max_iters`` times). Halted samples leave the stepper at once.

    Args:
        stepper: the iterations.
        batch: the number of samples.
        rule: the stopping rule, or ``None``.
        max_iters: the most iterations per sample.
        min_iters: the fewest iterations per sample before the rule is asked.
        running: whether iterations are draws whose class probabilities are averaged (sampling, views) rather than
            refinements of one output.
        anytime: return each sample's output at its best-scoring iteration (by ``rule.score``) instead of its last.
        stats: counts to add this batch to.
    """
    output: Any = None
    iterations = torch.zeros(batch, dtype=torch.long)
    classes = rule is not None and rule.uses_classes
    statistics = _Statistics(running, rule.window if rule is not None else 1)
    best: Any = None
    best_score: Tensor | None = None
    halted: dict[str, int] = {}
    active = torch.arange(batch)
    for t in range(1, max_iters + 1):
        current = stepper.step(t)
        if batch == 0:
            return stepper.result(active.to(current.device)), iterations.to(current.device)
        trace = statistics.update(current, t, classes)
        stop = torch.zeros(len(active), dtype=torch.bool, device=current.device)
        if rule is not None and t >= min_iters:
            stop = rule.stops(trace)
        final = stop | (t == max_iters)
        if anytime:
            assert rule is not None
            score, now = rule.score(trace), stepper.result(torch.arange(len(active), device=current.device))
            if best is None or best_score is None:
                best, best_score = now, score
            else:
                better = score > best_score
                best_score = torch.where(better, score, best_score)
                best = tree_map(functools.partial(_choose, better), now, best)
        if final.any():
            rows = final.nonzero().squeeze(1)
            values = select_rows(best, rows, len(active)) if anytime else stepper.result(rows)
            where = active.index_select(0, rows.cpu())
            if output is None:
                output = tree_map(lambda v: v.new_zeros((batch, *v.shape[1:])), values)
            output = put_rows(output, where, values)
            iterations[where] = t
            _count_halted(halted, rule, trace, stop, final)
        keep = (~final).nonzero().squeeze(1)
        if not len(keep):
            break
        if len(keep) < len(active):
            stepper.keep(keep)
            statistics.keep(keep)
            if anytime:
                best, best_score = select_rows((best, best_score), keep, len(active))
            active = active.index_select(0, keep.cpu())
    iterations = iterations.to(current.device)
    if stats is not None:
        stats.samples += batch
        stats.iterations += int(iterations.sum())
        stats.budget += batch * max_iters
        for name, count in halted.items():
            stats.halted[name] = stats.halted.get(name, 0) + count
    return output, iterations


def _choose(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """Rows of ``new`` where ``mask`` holds, of ``old`` elsewhere."""
    return torch.where(mask.view(-1, *[1] * (new.ndim - 1)), new, old)


def _count_halted(halted: dict[str, int], rule: StoppingRule | None, trace: Trace, stop: Tensor, final: Tensor) -> None:
    """Add to ``halted`` how many samples each named rule stopped, and how many ran out of iterations."""
    if rule is not None and stop.any():
        for name, held in rule.fired(trace).items():
            halted[name] = halted.get(name, 0) + int((held & stop).sum())
    halted[MAX_ITERS] = halted.get(MAX_ITERS, 0) + int((final & ~stop).sum())


class Draws:
    """Iterations that are draws of one output per sample (random forward passes, augmented views), merged.

    Args:
        draw: ``draw(iteration, x, *args, **kwargs)`` gives the output of one draw for the running samples, mapped
            back to the input's frame.
        x, args, kwargs: the forward's input and further arguments; batch-first tensors among them follow the
            running samples.
        merger: merges the draws of each sample.
        tracker: accumulates uncertainty measures, if any are requested.
    """

    def __init__(
        self,
        draw: Callable[..., Tensor],
        x: Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        merger: Merger,
        tracker: UncertaintyAccumulator | None = None,
    ) -> None:
        self.draw, self.merger, self.tracker = draw, merger, tracker
        self.inputs: tuple[Tensor, tuple[Any, ...], dict[str, Any]] = (x, args, kwargs)
        self.dtype: torch.dtype | None = None

    def step(self, iteration: int) -> Tensor:
        x, args, kwargs = self.inputs
        y = self.draw(iteration, x, *args, **kwargs)
        self.dtype = self.dtype or y.dtype
        stacked = y.to(torch.promote_types(y.dtype, torch.float32)).unsqueeze(0)
        self.merger.add(stacked)
        if self.tracker is not None:
            self.tracker.add(stacked)
        return y

    def keep(self, index: Tensor) -> None:
        self.inputs = select_rows(self.inputs, index, len(self.inputs[0]))
        self.merger.keep(index)
        if self.tracker is not None:
            self.tracker.keep(index)

    def result(self, index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The merged outputs (in the draws' dtype) and uncertainty measures of the running samples at ``index``."""
        merged = self.merger.result()
        extras = self.tracker.result(merged) if self.tracker is not None else {}
        return merged.index_select(0, index).to(self.dtype), select_rows(extras, index, len(merged))
