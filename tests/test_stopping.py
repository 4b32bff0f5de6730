"""Stopping rules against hand-computed cases away from their thresholds, BetaVote against the closed form."""

import math

import pytest
import torch
from scipy import stats

from ttc_lightning import stopping
from ttc_lightning.stopping import Trace


def trace(p=None, votes=None, recent=None, stable=None, estimate=None, previous=None, iteration=3) -> Trace:
    p = None if p is None else torch.tensor(p, dtype=torch.float32)
    some = next(v for v in (p, votes, recent, stable, estimate) if v is not None)
    rows = len(some)
    return Trace(
        iteration=iteration,
        estimate=torch.zeros(rows, 1) if estimate is None else torch.tensor(estimate),
        previous=None if previous is None else torch.tensor(previous),
        mean_prob=p,
        votes=None if votes is None else torch.tensor(votes, dtype=torch.float32),
        recent=None if recent is None else torch.tensor(recent),
        stable=None if stable is None else torch.tensor(stable),
    )


PROBS = [[0.95, 0.03, 0.02], [0.6, 0.3, 0.1], [0.34, 0.33, 0.33]]


def test_confidence_margin_entropy_by_hand():
    t = trace(PROBS)
    assert stopping.Confidence(0.9).stops(t).tolist() == [True, False, False]
    assert stopping.Confidence(0.5).stops(t).tolist() == [True, True, False]
    # margins 0.92, 0.3, 0.01
    assert stopping.Margin(0.25).stops(t).tolist() == [True, True, False]
    assert stopping.Margin(0.5).stops(t).tolist() == [True, False, False]
    entropies = [-sum(q * math.log(q) for q in row) for row in PROBS]  # 0.232, 0.898, 1.0986
    assert torch.allclose(-stopping.Entropy().score(t), torch.tensor(entropies), atol=1e-6)
    assert stopping.Entropy(0.5).stops(t).tolist() == [True, False, False]
    assert stopping.Entropy(1.0).stops(t).tolist() == [True, True, False]


def test_stable_counts_patience():
    t = trace(stable=[0, 1, 2, 5])
    assert stopping.Stable(2).stops(t).tolist() == [False, False, True, True]
    assert stopping.Stable(1).stops(t).tolist() == [False, True, True, True]


def test_converged_relative_change():
    previous = [[3.0, 4.0], [1.0, 0.0]]  # norms 5 and 1
    estimate = [[3.0, 4.05], [1.2, 0.0]]  # changes 0.05/5 = 0.01 and 0.2/1 = 0.2
    t = trace(estimate=estimate, previous=previous)
    rule = stopping.Converged(0.05)
    assert torch.allclose(rule.change(t), torch.tensor([0.01, 0.2]), atol=1e-6)
    assert rule.stops(t).tolist() == [True, False]
    assert stopping.Converged(0.5).stops(t).tolist() == [True, True]
    first = trace(estimate=estimate, previous=None, iteration=1)
    assert not stopping.Converged(10.0).stops(first).any()  # never after the first iteration


@pytest.mark.parametrize(
    "v1, v2", [(0, 0), (1, 0), (3, 0), (4, 0), (5, 2), (8, 3), (10, 10), (20, 4), (40, 25), (100, 70)]
)
def test_beta_top_two_matches_the_regularised_incomplete_beta(v1, v2):
    votes = torch.tensor([[float(v2), 0.0, float(v1)]])  # the top two need not come first
    expected = stats.beta.sf(0.5, v1 + 1, v2 + 1)  # P(p1 > 1/2) = P(p1 > p2) under Beta(v1 + 1, v2 + 1)
    assert stopping.beta_top_two(votes).item() == pytest.approx(expected, abs=1e-6)


def test_beta_vote_thresholds_by_hand():
    # (4, 0): 1 - 2^-5 = 0.96875; (3, 0): 1 - 2^-4 = 0.9375; (4, 1): 1 - 7/64 = 0.890625
    t = trace(votes=[[4, 0, 0], [3, 0, 0], [1, 4, 0]])
    assert torch.allclose(stopping.BetaVote().score(t), torch.tensor([0.96875, 0.9375, 0.890625]))
    assert stopping.BetaVote(0.95).stops(t).tolist() == [True, False, False]
    assert stopping.BetaVote(0.9).stops(t).tolist() == [True, True, False]


def test_window_agreement():
    recent = [[2, 2, 2], [1, 2, 2], [-1, 2, 2], [0, 0, 1]]
    assert stopping.WindowAgreement(3).stops(trace(recent=recent)).tolist() == [True, False, False, False]
    assert stopping.WindowAgreement(2).stops(trace(recent=recent)).tolist() == [True, True, True, False]
    assert not stopping.WindowAgreement(3).stops(trace(recent=recent, iteration=2)).any()


def test_composition_any_all_and_flattening():
    t = trace(PROBS, stable=[0, 3, 0])
    confident, stable = stopping.Confidence(0.9), stopping.Stable(2)
    assert (confident | stable).stops(t).tolist() == [True, True, False]
    assert (confident & stable).stops(t).tolist() == [False, False, False]
    assert stopping.AnyOf([confident, stable]).stops(t).tolist() == [True, True, False]
    nested = confident | stable | stopping.Margin(0.25)
    assert isinstance(nested, stopping.AnyOf) and len(nested.rules) == 3
    assert nested.window == 1 and (stable | stopping.WindowAgreement(4)).window == 4
    fired = nested.fired(t)
    assert {k: v.tolist() for k, v in fired.items()} == {
        "Confidence(0.9)": [True, False, False],
        "Stable(2)": [False, True, False],
        "Margin(0.25)": [True, True, False],
    }
    assert not stopping.Converged().uses_classes and (stopping.Converged() | confident).uses_classes


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: stopping.Confidence(1.5), "threshold"),
        (lambda: stopping.Margin(-0.1), "threshold"),
        (lambda: stopping.Entropy(-1), "threshold"),
        (lambda: stopping.Stable(0), "patience"),
        (lambda: stopping.Converged(-1e-3), "tol"),
        (lambda: stopping.BetaVote(True), "confidence"),
        (lambda: stopping.WindowAgreement(0), "window"),
    ],
)
def test_bad_arguments_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_combination_needs_rules():
    with pytest.raises(TypeError, match="AnyOf"):
        stopping.AnyOf([])
    with pytest.raises(TypeError, match="AllOf"):
        stopping.AllOf([stopping.Confidence(), "Stable"])
