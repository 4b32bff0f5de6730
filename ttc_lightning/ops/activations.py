"""Class probabilities of logits under an activation, and logits of probabilities.

``softmax`` treats the classes on ``dim`` as exclusive; ``sigmoid`` treats every element as an independent binary
label (multi-label), so ``dim`` is unused there.
"""

import torch
from torch import Tensor

ACTIVATIONS = ("softmax", "sigmoid")


def probs(y: Tensor, activation: str, dim: int) -> Tensor:
    """Probabilities of logits ``y``."""
    return torch.softmax(y, dim) if activation == "softmax" else torch.sigmoid(y)


def log_probs(y: Tensor, activation: str, dim: int) -> Tensor:
    """Log-probabilities of logits ``y``."""
    return torch.log_softmax(y, dim) if activation == "softmax" else torch.nn.functional.logsigmoid(y)


def logits_from_log_probs(log_p: Tensor, activation: str) -> Tensor:
    """Logits whose activation gives ``exp(log_p)``: ``log_p`` itself for softmax, ``log(p / (1 - p))`` for sigmoid."""
    if activation == "softmax":
        return log_p
    return log_p - torch.log(-torch.expm1(log_p.clamp(max=-torch.finfo(log_p.dtype).tiny)))
