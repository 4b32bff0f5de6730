"""``ttc_lightning.ops.entropy`` against formulas written out independently in numpy (float64)."""

import math

import numpy as np
import pytest
import torch

from ttc_lightning.ops.entropy import entropy, entropy_of_probs, marginal_entropy, soft_cross_entropy


def logits(*shape: int, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def np_entropy(p: np.ndarray, axis: int) -> np.ndarray:
    """``-sum p log p`` with ``0 log 0 = 0``."""
    terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0)
    return -terms.sum(axis=axis)


def np_binary_entropy(p: np.ndarray) -> np.ndarray:
    return np_entropy(np.stack([p, 1 - p]), 0)


def close(got: torch.Tensor, want: np.ndarray, tol: float = 1e-5) -> None:
    assert tuple(got.shape) == want.shape
    np.testing.assert_allclose(got.double().numpy(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape, dim", [((6, 5), 1), ((3, 4, 5, 2), 1), ((4, 7), -1), ((5, 3, 2), 2)])
def test_entropy_of_softmax_is_the_direct_formula(shape, dim):
    x = logits(*shape)
    close(entropy(x, dim), np_entropy(np_softmax(x.double().numpy(), dim), dim))


def test_entropy_of_sigmoid_is_the_binary_entropy_of_every_label():
    x = logits(6, 4, scale=4.0)
    got = entropy(x, activation="sigmoid")
    close(got, np_binary_entropy(np_sigmoid(x.double().numpy())))


def test_entropy_special_values():
    assert torch.allclose(entropy(torch.zeros(3, 7)), torch.full((3,), math.log(7)))
    assert torch.allclose(entropy(torch.tensor([[50.0, -50.0]])), torch.zeros(1), atol=1e-6)
    assert torch.allclose(entropy(torch.zeros(2, 3), activation="sigmoid"), torch.full((2, 3), math.log(2)))
    assert entropy(torch.zeros(2, 3, dtype=torch.float16)).dtype == torch.float32


def test_entropy_of_probs_defaults_to_log_of_clamped_probabilities():
    p = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.25, 0.25]])
    close(entropy_of_probs(p), np_entropy(p.double().numpy(), 1))
    given = entropy_of_probs(p[1:], p[1:].log())
    assert torch.equal(given, entropy_of_probs(p[1:]))
    q = torch.tensor([0.0, 0.2, 0.5, 1.0])
    close(entropy_of_probs(q, activation="sigmoid"), np_binary_entropy(q.double().numpy()), tol=1e-5)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_marginal_entropy_is_the_entropy_of_the_mean_probability(activation):
    x = logits(5, 7, 6) * torch.tensor([0.1, 1.0, 10.0, 60.0, 3.0]).view(5, 1, 1)
    values = x.double().numpy()
    if activation == "softmax":
        want = np_entropy(np_softmax(values, 2).mean(0), 1)
    else:
        want = np_binary_entropy(np_sigmoid(values).mean(0))
    close(marginal_entropy(x, activation=activation), want)


def test_marginal_entropy_class_dim_of_dense_outputs():
    x = logits(3, 2, 4, 5, 5)  # views, batch, classes, height, width
    want = np_entropy(np_softmax(x.double().numpy(), 2).mean(0), 1)
    close(marginal_entropy(x, dim=1), want)
    close(marginal_entropy(x.movedim(2, -1), dim=-1), want)


def test_marginal_entropy_of_one_view_is_the_entropy():
    x = logits(1, 4, 3)
    torch.testing.assert_close(marginal_entropy(x), entropy(x[0]))


def test_marginal_entropy_gradients_stay_finite_on_saturated_views():
    x = torch.tensor([[[1e4, -1e4]], [[-1e4, 1e4]]], requires_grad=True)
    value = marginal_entropy(x)
    value.sum().backward()
    torch.testing.assert_close(value, torch.tensor([math.log(2)]))
    assert torch.isfinite(x.grad).all()


def test_soft_cross_entropy_under_softmax():
    student, teacher = logits(6, 5, seed=1), logits(6, 5, seed=2)
    q, p = np_softmax(teacher.double().numpy(), 1), np_softmax(student.double().numpy(), 1)
    close(soft_cross_entropy(student, teacher), -(q * np.log(p)).sum(1))
    torch.testing.assert_close(soft_cross_entropy(student, student), entropy(student))


def test_soft_cross_entropy_under_sigmoid():
    student, teacher = logits(6, 5, seed=1), logits(6, 5, seed=2)
    q, p = np_sigmoid(teacher.double().numpy()), np_sigmoid(student.double().numpy())
    close(soft_cross_entropy(student, teacher, activation="sigmoid"), -(q * np.log(p) + (1 - q) * np.log(1 - p)))
    torch.testing.assert_close(
        soft_cross_entropy(student, student, activation="sigmoid"), entropy(student, activation="sigmoid")
    )


def test_soft_cross_entropy_keeps_the_dtype():
    x = logits(3, 4).double()
    assert soft_cross_entropy(x, x).dtype == torch.float64
