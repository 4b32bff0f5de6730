"""Entropy, marginal entropy and soft cross-entropy, in nats, under softmax or sigmoid.

Under ``softmax`` the classes on ``dim`` are exclusive and every result is per sample (``dim`` reduced). Under
``sigmoid`` every element is a binary label and every result is per element (the input's shape), e.g. the binary
entropy ``-(p log p + (1 - p) log(1 - p))``.

This is the one module of the package that writes ``p * log p``.
"""

import math

import torch
from torch import Tensor

from ttc_lightning.ops.activations import log_probs


def entropy_of_probs(p: Tensor, log_p: Tensor | None = None, activation: str = "softmax", dim: int = 1) -> Tensor:
    """Entropy of probabilities ``p``.

    Args:
        p: probabilities.
        log_p: their logarithms, when known more precisely than ``log p`` (e.g. from ``log_softmax``). Default: the
            log of ``p`` clamped from below at the dtype's smallest normal number, so zero probabilities add zero.
        activation: ``softmax`` (classes on ``dim``) or ``sigmoid`` (binary labels).
        dim: the class dimension (softmax only).
    """
    if log_p is None:
        log_p = p.clamp(min=torch.finfo(p.dtype).tiny).log()
    if activation == "softmax":
        return -(p * log_p).sum(dim)
    log_q = torch.log1p(-p.clamp(max=1 - torch.finfo(p.dtype).eps))
    return -(p * log_p + (1 - p) * log_q)


def entropy(logits: Tensor, dim: int = 1, activation: str = "softmax") -> Tensor:
    """Entropy of the predictions of ``logits``, computed in float32 (``logits.float()``); TENT's per-sample loss."""
    log_p = log_probs(logits.float(), activation, dim)
    return entropy_of_probs(log_p.exp(), log_p, activation, dim)


def marginal_entropy(logits: Tensor, dim: int = 1, activation: str = "softmax") -> Tensor:
    """Entropy of the mean prediction over views (MEMO's marginal entropy), computed in float32.

    Args:
        logits: ``(views, *shape)``: the views' logits stacked on dim 0.
        dim: the class dimension of ``shape`` (softmax only).
        activation: ``softmax`` or ``sigmoid``.

    The views' probabilities are averaged in the log domain (``logsumexp`` of the log-probabilities minus
    ``log(views)``), so that gradients stay finite for saturated logits.
    """
    stack_dim = dim + 1 if dim >= 0 else dim
    log_marginal = torch.logsumexp(log_probs(logits.float(), activation, stack_dim), 0) - math.log(logits.shape[0])
    return entropy_of_probs(log_marginal.exp(), log_marginal, activation, dim)


def soft_cross_entropy(logits: Tensor, target_logits: Tensor, dim: int = 1, activation: str = "softmax") -> Tensor:
    """Cross-entropy from the soft targets of ``target_logits`` to the predictions of ``logits``, in their dtype.

    Softmax: ``-(softmax(target) * log_softmax(logits)).sum(dim)`` (CoTTA's student loss). Sigmoid:
    ``-(q log p + (1 - q) log(1 - p))`` with ``q = sigmoid(target)``, ``p = sigmoid(logits)``.
    """
    if activation == "softmax":
        return -(target_logits.softmax(dim) * logits.log_softmax(dim)).sum(dim)
    q = torch.sigmoid(target_logits)
    logsigmoid = torch.nn.functional.logsigmoid
    return -(q * logsigmoid(logits) + (1 - q) * logsigmoid(-logits))
