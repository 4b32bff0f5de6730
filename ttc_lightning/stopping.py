"""Per-sample stopping rules for iterative inference and adaptive test-time augmentation.

A rule looks at a :class:`Trace` (what the iterations so far produced, one row per sample still running) and
returns which samples may stop, and a score that ranks iterations for best-so-far (anytime) outputs. Rules combine
with ``|`` (any) and ``&`` (all) in Python, and with :class:`AnyOf` / :class:`AllOf` in YAML.

Probability rules (:class:`Confidence`, :class:`Margin`, :class:`Entropy`, :class:`Stable`) use the class
probabilities (softmax over dim 1) of the current estimate: the running mean over iterations when they are draws
(sampling, augmented views), the latest output's when iterations refine it. Vote rules (:class:`BetaVote`,
:class:`WindowAgreement`) use the iterations' argmax votes; :class:`Converged` the change of the running mean of the
outputs (draws) or of the output (refinement).
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from typing_extensions import override

from ttc_lightning.checks import check_int
from ttc_lightning.ops.entropy import entropy_of_probs

__all__ = [
    "AllOf",
    "AnyOf",
    "BetaVote",
    "Confidence",
    "Converged",
    "Entropy",
    "Margin",
    "Stable",
    "StoppingRule",
    "Trace",
    "WindowAgreement",
    "beta_top_two",
]


@dataclass
class Trace:
    """What the iterations so far produced, one row per running sample.

    Attributes:
        iteration: iterations done (the same for every running sample).
        estimate: the current estimate: the running mean of the outputs when iterations are draws (sampling,
            augmented views), the last output when they refine it.
        previous: the estimate after the iteration before (``None`` after the first).
        mean_prob: class probabilities ``(B, C)``: the running mean of the draws' probabilities, or the last
            output's in refinement (``None`` when no rule needs classes).
        votes: argmax vote counts of the iterations ``(B, C)`` (``None`` likewise).
        recent: argmax of the last iterations ``(B, k)``, newest last, ``-1`` before the first (``None`` likewise).
        stable: consecutive iterations over which the argmax of ``mean_prob`` has not changed ``(B,)`` (``None``
            likewise).
    """

    iteration: int
    estimate: Tensor
    previous: Tensor | None
    mean_prob: Tensor | None = None
    votes: Tensor | None = None
    recent: Tensor | None = None
    stable: Tensor | None = None


class StoppingRule(ABC):
    """A per-sample stopping rule."""

    #: The longest run of recent argmax votes the rule looks at.
    window: int = 1
    #: Whether the rule needs class probabilities and votes (outputs ``(B, C)`` with classes on dim 1).
    uses_classes: bool = True

    @abstractmethod
    def stops(self, trace: Trace) -> Tensor:
        """``(B,)`` bool: which running samples may stop now."""

    @abstractmethod
    def score(self, trace: Trace) -> Tensor:
        """``(B,)`` float: how good the current iteration is (higher is better), for best-so-far outputs."""

    def fired(self, trace: Trace) -> dict[str, Tensor]:
        """Which named rule holds, per sample (for the fraction halted by each rule)."""
        return {repr(self): self.stops(trace)}

    def __or__(self, other: "StoppingRule") -> "AnyOf":
        return AnyOf([self, other])

    def __and__(self, other: "StoppingRule") -> "AllOf":
        return AllOf([self, other])


def _probs(trace: Trace) -> Tensor:
    assert trace.mean_prob is not None, "the halting loop computes probabilities for rules that use classes"
    return trace.mean_prob


def _fraction(name: str, value: float, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"`{name}`={value!r} must be a number in [{low}, {high}].")
    return float(value)


class Confidence(StoppingRule):
    """Stop when the running mean's top class probability reaches ``threshold``.

    Raises:
        ValueError: ``threshold`` is not a number in ``[0, 1]``.
    """

    def __init__(self, threshold: float = 0.9) -> None:
        self.threshold = _fraction("threshold", threshold)

    @override
    def stops(self, trace: Trace) -> Tensor:
        return self.score(trace) >= self.threshold

    @override
    def score(self, trace: Trace) -> Tensor:
        return _probs(trace).amax(1)

    @override
    def __repr__(self) -> str:
        return f"Confidence({self.threshold})"


class Margin(StoppingRule):
    """Stop when the running mean's top-1 minus top-2 probability reaches ``threshold``.

    Raises:
        ValueError: ``threshold`` is not a number in ``[0, 1]``.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = _fraction("threshold", threshold)

    @override
    def stops(self, trace: Trace) -> Tensor:
        return self.score(trace) >= self.threshold

    @override
    def score(self, trace: Trace) -> Tensor:
        top = _probs(trace).topk(2, dim=1).values
        return top[:, 0] - top[:, 1]

    @override
    def __repr__(self) -> str:
        return f"Margin({self.threshold})"


class Entropy(StoppingRule):
    """Stop when the entropy (nats) of the running mean falls to ``threshold`` or below.

    Raises:
        ValueError: ``threshold`` is not a non-negative number.
    """

    def __init__(self, threshold: float = 0.2) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold < 0:
            raise ValueError(f"`threshold`={threshold!r} must be a non-negative number of nats.")
        self.threshold = float(threshold)

    @override
    def stops(self, trace: Trace) -> Tensor:
        return -self.score(trace) <= self.threshold

    @override
    def score(self, trace: Trace) -> Tensor:
        return -entropy_of_probs(_probs(trace))

    @override
    def __repr__(self) -> str:
        return f"Entropy({self.threshold})"


class Stable(StoppingRule):
    """Stop when the argmax of the running mean has not changed over the last ``patience`` iterations.

    Raises:
        ValueError: ``patience`` is not an integer >= 1.
    """

    def __init__(self, patience: int = 2) -> None:
        self.patience = check_int("patience", patience, 1)

    @override
    def stops(self, trace: Trace) -> Tensor:
        return self.score(trace) >= self.patience

    @override
    def score(self, trace: Trace) -> Tensor:
        assert trace.stable is not None
        return trace.stable.float()

    @override
    def __repr__(self) -> str:
        return f"Stable({self.patience})"


class Converged(StoppingRule):
    """Stop when the estimate's relative L2 change, ``||y_t - y_{t-1}|| / ||y_{t-1}||`` per sample, is at most
    ``tol`` (never after the first iteration). The estimate is the refined output in refinement, the running mean
    of the outputs when iterations are draws. Works on outputs of any shape.

    Raises:
        ValueError: ``tol`` is not a non-negative number.
    """

    uses_classes = False

    def __init__(self, tol: float = 1e-3) -> None:
        if isinstance(tol, bool) or not isinstance(tol, int | float) or tol < 0:
            raise ValueError(f"`tol`={tol!r} must be a non-negative number.")
        self.tol = float(tol)

    def change(self, trace: Trace) -> Tensor:
        if trace.previous is None:
            return torch.full((len(trace.estimate),), math.inf, device=trace.estimate.device)
        now, before = trace.estimate.flatten(1).float(), trace.previous.flatten(1).float()
        return (now - before).norm(dim=1) / before.norm(dim=1).clamp(min=torch.finfo(torch.float32).tiny)

    @override
    def stops(self, trace: Trace) -> Tensor:
        return self.change(trace) <= self.tol

    @override
    def score(self, trace: Trace) -> Tensor:
        return -self.change(trace)

    @override
    def __repr__(self) -> str:
        return f"Converged({self.tol})"


def beta_top_two(votes: Tensor) -> Tensor:
    """``P(p1 > p2)`` under ``Beta(v1 + 1, v2 + 1)`` for the top two vote counts ``v1 >= v2`` of each row.

    With integer parameters ``a = v1 + 1``, ``b = v2 + 1`` and ``n = a + b - 1``,
    ``P(X > 1/2) = 2^-n * sum_{j < a} C(n, j)`` (the regularised incomplete beta function at 1/2).
    """
    top = votes.topk(2, dim=1).values.double() if votes.shape[1] > 1 else torch.cat([votes, 0 * votes], 1).double()
    a, b = top[:, 0] + 1, top[:, 1] + 1
    n = a + b - 1
    j = torch.arange(int(n.max().item()) + 1, device=votes.device, dtype=torch.float64)
    log_terms = torch.lgamma(n[:, None] + 1) - torch.lgamma(j + 1) - torch.lgamma(n[:, None] - j + 1)
    log_terms = log_terms.masked_fill(j[None, :] >= a[:, None], -math.inf)
    return torch.exp(torch.logsumexp(log_terms, 1) - n * math.log(2)).float()


class BetaVote(StoppingRule):
    """Adaptive-Consistency's rule: stop when ``P(p1 > p2 | Beta(v1 + 1, v2 + 1)) >= confidence``, ``v1 >= v2``
    the top two argmax vote counts (Aggarwal et al. 2023).

    Raises:
        ValueError: ``confidence`` is not a number in ``[0, 1]``.
    """

    def __init__(self, confidence: float = 0.95) -> None:
        self.confidence = _fraction("confidence", confidence)

    @override
    def stops(self, trace: Trace) -> Tensor:
        return self.score(trace) >= self.confidence

    @override
    def score(self, trace: Trace) -> Tensor:
        assert trace.votes is not None
        return beta_top_two(trace.votes)

    @override
    def __repr__(self) -> str:
        return f"BetaVote({self.confidence})"


class WindowAgreement(StoppingRule):
    """ESC's rule: stop when the last ``window`` iterations all voted for the same class (Li et al. 2024).

    Raises:
        ValueError: ``window`` is not an integer >= 1.
    """

    def __init__(self, window: int = 3) -> None:
        self.window = check_int("window", window, 1)

    @override
    def stops(self, trace: Trace) -> Tensor:
        return self.score(trace) >= 1

    @override
    def score(self, trace: Trace) -> Tensor:
        assert trace.recent is not None
        if trace.iteration < self.window:
            return torch.zeros(len(trace.recent), device=trace.recent.device)
        last = trace.recent[:, -self.window :]
        return (last == last[:, -1:]).all(1).float()

    @override
    def __repr__(self) -> str:
        return f"WindowAgreement({self.window})"


class _Combination(StoppingRule):
    """Rules combined (nested combinations of the same kind flattened).

    Raises:
        TypeError: ``rules`` is not a non-empty list of stopping rules.
    """

    def __init__(self, rules: Sequence[StoppingRule]) -> None:
        if not isinstance(rules, Sequence):
            raise TypeError(
                f"{type(self).__name__} needs a list of stopping rules, such as [rule_a, rule_b]; got {rules!r}."
            )
        rules = list(rules)
        if not rules or not all(isinstance(rule, StoppingRule) for rule in rules):
            raise TypeError(f"{type(self).__name__} needs a non-empty list of stopping rules; got {rules!r}.")
        self.rules = [r for rule in rules for r in (rule.rules if type(rule) is type(self) else [rule])]
        self.window = max(rule.window for rule in self.rules)
        self.uses_classes = any(rule.uses_classes for rule in self.rules)

    @override
    def score(self, trace: Trace) -> Tensor:
        return torch.stack([rule.score(trace) for rule in self.rules]).amax(0)

    @override
    def fired(self, trace: Trace) -> dict[str, Tensor]:
        return {name: held for rule in self.rules for name, held in rule.fired(trace).items()}

    @override
    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.rules!r})"


class AnyOf(_Combination):
    """Stop when any of the rules holds (``a | b``)."""

    @override
    def stops(self, trace: Trace) -> Tensor:
        return torch.stack([rule.stops(trace) for rule in self.rules]).any(0)


class AllOf(_Combination):
    """Stop when all of the rules hold (``a & b``)."""

    @override
    def stops(self, trace: Trace) -> Tensor:
        return torch.stack([rule.stops(trace) for rule in self.rules]).all(0)
