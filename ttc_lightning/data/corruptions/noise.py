"""Noise corruptions: Gaussian, shot and impulse noise (CIFAR-10-C) and speckle noise (validation).

Images with a side below 32 px take ImageNet-C's magnitudes, as MNIST-C does: CIFAR-10-C's barely touch them.
"""

import torch
from torch import Tensor

from ttc_lightning.data.corruptions.common import is_small, rand, randn

# Parameter tables, one entry per severity (make_cifar_c.py).
GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)  # noise standard deviation
SHOT_NOISE = (500.0, 250.0, 100.0, 75.0, 50.0)  # photons at intensity 1
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)  # fraction of values set to 0 or 1
SPECKLE_NOISE = (0.06, 0.1, 0.12, 0.16, 0.2)  # standard deviation of the multiplicative noise
# Images with a side below 32 px (MNIST-C, which uses ImageNet-C's tables).
SMALL_GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)
SMALL_SHOT_NOISE = (60.0, 25.0, 12.0, 5.0, 3.0)
SMALL_IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)
SMALL_SPECKLE_NOISE = (0.15, 0.2, 0.35, 0.45, 0.6)


def gaussian_noise(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """Additive Gaussian noise."""
    std = (SMALL_GAUSSIAN_NOISE if is_small(x) else GAUSSIAN_NOISE)[level]
    return x + std * randn(tuple(x.shape), rng, x)


def shot_noise(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """Poisson photon noise (sampled on the CPU in float64, so a seed gives the same noise on every device)."""
    photons = (SMALL_SHOT_NOISE if is_small(x) else SHOT_NOISE)[level]
    return torch.poisson(x.detach().double().cpu() * photons, generator=rng).to(x) / photons


def impulse_noise(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """Salt and pepper: a fraction of the values set to 0 or 1, half each."""
    amount = (SMALL_IMPULSE_NOISE if is_small(x) else IMPULSE_NOISE)[level]
    draw = rand(tuple(x.shape), rng, x)
    out = torch.where(draw < amount / 2, torch.zeros_like(x), x)  # pepper
    return torch.where((draw >= amount / 2) & (draw < amount), torch.ones_like(x), out)  # salt


def speckle_noise(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """Multiplicative Gaussian noise ``x + x * N(0, std)``: dark pixels stay dark."""
    std = (SMALL_SPECKLE_NOISE if is_small(x) else SPECKLE_NOISE)[level]
    return x + x * std * randn(tuple(x.shape), rng, x)
