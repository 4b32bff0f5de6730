"""Blur corruptions: defocus, glass, motion and zoom blur (CIFAR-10-C) and Gaussian blur (validation).

Blur lengths are CIFAR-10-C's at 32 px times :func:`~ttc_lightning.data.corruptions.common.spatial_scale`, resampled
exactly so that fractional sizes still act.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from ttc_lightning.data.corruptions.common import REFERENCE_SIDE, rand, spatial_scale
from ttc_lightning.data.corruptions.filters import gaussian_taps, motion_blur, pixel_grid, sample, scaled_blur, zoom

# Parameter tables, one entry per severity (make_cifar_c.py unless said otherwise).
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))  # disk radius, alias sigma (px)
# Ours after CIFAR-10-C's ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)), whose first two
# severities differ by an invisible blur and whose last smooths the jumps of the fourth away: jumps grow instead.
GLASS_BLUR = ((0.05, 0.6, 1), (0.25, 0.8, 1), (0.4, 1.0, 1), (0.25, 1.0, 2), (0.4, 1.4, 2))  # sigma, jump (px), passes
MOTION_BLUR = (1.0, 1.5, 2.0, 2.5, 3.0)  # sigma (px) of the one-sided Gaussian trail
ZOOM_BLUR = (1.06, 1.11, 1.16, 1.21, 1.26)  # zoom factors 1, 1.01, ... below this bound
GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)  # sigma (px)


def defocus_blur(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """``make_cifar_c.disk``: the pixels within ``radius`` of the centre of a 17x17 grid, smoothed by a 3x3 Gaussian
    of sigma ``alias``, then scaled by :func:`spatial_scale`."""
    radius, alias = DEFOCUS_BLUR[level]
    offsets = torch.arange(-8, 9, dtype=torch.float64)
    disk = (offsets.view(-1, 1) ** 2 + offsets.view(1, -1) ** 2 <= radius**2).double()
    smooth = torch.exp(-torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64) / (2 * alias**2))
    smooth = smooth / smooth.sum()
    kernel = F.conv2d(disk.view(1, 1, 17, 17), (smooth.view(-1, 1) * smooth).view(1, 1, 3, 3), padding=1)[0, 0]
    kernel = kernel[kernel.sum(1) > 0][:, kernel.sum(0) > 0]
    return scaled_blur(x, kernel / kernel.sum(), spatial_scale(*x.shape[-2:]))


def glass_blur(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """Blur, move every pixel ``passes`` times by a random jump of up to ``jump`` px per axis (one bilinear gather per
    pass rather than ``make_cifar_c.py``'s sequential swaps of whole pixels), blur again."""
    sigma, jump, passes = GLASS_BLUR[level]
    scale = spatial_scale(*x.shape[-2:])
    taps = gaussian_taps(sigma)
    kernel = taps.view(-1, 1) * taps
    out = scaled_blur(x, kernel, scale)
    grid = pixel_grid(x)
    for _ in range(passes):
        jumps = rand((len(x), *x.shape[-2:], 2), rng, x) * 2 - 1
        out = sample(out, grid + jump * scale * jumps)
    return scaled_blur(out, kernel, scale)


def motion_blur_corruption(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """A Gaussian trail along a random angle in ``[-45, 45)`` degrees per sample."""
    angle = torch.deg2rad(torch.rand(len(x), generator=rng) * 90 - 45)
    return motion_blur(x, MOTION_BLUR[level] * spatial_scale(*x.shape[-2:]), angle)


def zoom_blur(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """Mean of the image and its zooms by 1, 1.01, ...; the streak lengths (``zoom - 1`` times the half side) are
    scaled like any blur length, so the zoom excess is ``zoom - 1`` times ``spatial_scale * 32 / side``."""
    stretch = spatial_scale(*x.shape[-2:]) * REFERENCE_SIDE / min(x.shape[-2:])
    steps = torch.arange(0.0, ZOOM_BLUR[level] - 1, 0.01, dtype=torch.float64)
    factors = (1 + stretch * steps).tolist()
    out = x.clone()
    for factor in factors:
        out = out + zoom(x, factor)
    return out / (len(factors) + 1)


def gaussian_blur_corruption(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """CIFAR-10-C's Gaussian kernel (scipy's truncation at 4 sigma) scaled by :func:`spatial_scale`; borders
    mirrored like the other blurs here (``skimage.filters.gaussian`` repeats the edge pixel)."""
    taps = gaussian_taps(GAUSSIAN_BLUR[level])
    return scaled_blur(x, taps.view(-1, 1) * taps, spatial_scale(*x.shape[-2:]))
