"""Weather corruptions: snow, frost, fog and brightness (CIFAR-10-C) and spatter (validation).

Geometry relative to the image (fog and frost patterns) is kept as it is; snow trails are CIFAR-10-C's at 32 px times
:func:`~ttc_lightning.data.corruptions.common.spatial_scale`.
"""

import math

import torch
from torch import Tensor

from ttc_lightning.data.corruptions.common import gray, rand, randn, spatial_scale
from ttc_lightning.data.corruptions.filters import gaussian_taps, motion_blur, pixel_grid, sample, scaled_blur, zoom

# Parameter tables, one entry per severity (make_cifar_c.py unless said otherwise).
# Mean, std, zoom, threshold, motion sigma (px), blend of the greyed image. Thresholds at severities 3 and 5 are
# ours (0.5, 0.6 for CIFAR-10-C's 0.55, 0.65), which leave as much snow as the severity below: more snow instead.
SNOW = (
    (0.1, 0.2, 1.0, 0.6, 3.0, 0.95),
    (0.1, 0.2, 1.0, 0.5, 4.0, 0.9),
    (0.15, 0.3, 1.75, 0.5, 4.0, 0.9),
    (0.25, 0.3, 2.25, 0.6, 6.0, 0.85),
    (0.3, 0.3, 1.25, 0.6, 12.0, 0.8),
)
# Image weight, frost weight. Ours after CIFAR-10-C's ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
# whose last severities dim the image under the same frost, bringing it closer to the clean one: the frost grows.
FROST = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.45), (0.75, 0.55))
FOG = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))  # fog strength, fractal decay
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to the HSV value
# Liquid mean, std, smoothing sigma (px), threshold, drop strength (water) or smoothing sigma (px, mud), mud. Ours
# after CIFAR-10-C's ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
# (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)), whose water at severity 3 changes digits more than
# its mud at 4 and 5: a calmer liquid at 3 (std 0.15) and lower mud thresholds (0.65, 0.63) grow the damage instead.
SPATTER = (
    (0.62, 0.1, 0.7, 0.7, 0.5, False),
    (0.65, 0.1, 0.8, 0.7, 0.5, False),
    (0.65, 0.15, 1.0, 0.69, 0.5, False),
    (0.65, 0.1, 0.7, 0.65, 0.6, True),
    (0.65, 0.1, 0.5, 0.63, 0.6, True),
)
# Colours of the drops, on the channels in CIFAR-10-C's order: pale turquoise water, brown mud.
SPATTER_WATER = (175 / 255, 238 / 255, 238 / 255)
SPATTER_MUD = (63 / 255, 42 / 255, 20 / 255)


def plasma(batch: int, height: int, width: int, decay: float, rng: torch.Generator) -> Tensor:
    """Diamond-square fractals ``(B, 1, H, W)`` in ``[0, 1]``, one per sample (``make_cifar_c.plasma_fractal``)."""
    size = 2 ** max(1, math.ceil(math.log2(max(height, width))))
    maps = torch.zeros(batch, size, size, dtype=torch.float64)
    step, wibble = size, 100.0

    def wibbled(total: Tensor) -> Tensor:
        return total / 4 + wibble * (torch.rand(total.shape, generator=rng, dtype=torch.float64) * 2 - 1) * wibble

    while step >= 2:
        half = step // 2
        corners = maps[:, ::step, ::step]
        squares = corners + corners.roll(-1, 1)
        maps[:, half::step, half::step] = wibbled(squares + squares.roll(-1, 2))
        centres, corners = maps[:, half::step, half::step], maps[:, ::step, ::step]
        maps[:, ::step, half::step] = wibbled(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        maps[:, half::step, ::step] = wibbled(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step, wibble = half, wibble / decay
    maps = maps[:, :height, :width]
    low = maps.amin((1, 2), keepdim=True)
    high = maps.amax((1, 2), keepdim=True)
    return ((maps - low) / (high - low).clamp_min(1e-12)).unsqueeze(1).float()


def snow(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """Zoomed, thresholded noise flakes with a motion trail, over a greyed and brightened image."""
    mean, std, magnify, threshold, sigma, blend = SNOW[level]
    b, _, h, w = x.shape
    flakes = zoom(mean + std * randn((b, 1, h, w), rng, x), magnify)
    flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes)
    angle = torch.deg2rad(torch.rand(b, generator=rng) * 90 - 135)
    flakes = motion_blur(flakes, sigma * spatial_scale(h, w), angle)
    greyed = blend * x + (1 - blend) * torch.maximum(x, gray(x) * 1.5 + 0.5)
    return greyed + flakes + flakes.flip(-2, -1)


def frost_texture(x: Tensor, rng: torch.Generator) -> Tensor:
    """Seeded ice: a fractal haze plus six-armed crystals (needles at 60 degrees, tapering) from random seeds."""
    b, _, h, w = x.shape
    haze = plasma(b, h, w, 2.0, rng).to(x)
    seeds = (rand((b, 1, h, w), rng, x) < 0.03) * (0.5 + 0.5 * rand((b, 1, h, w), rng, x))
    length = 0.25 * min(h, w)
    base = torch.rand(b, generator=rng) * math.pi
    grid = pixel_grid(x)
    crystals = torch.zeros_like(x[:, :1])
    for arm in range(3):
        angle = base + arm * math.pi / 3
        direction = torch.stack([angle.cos(), angle.sin()], -1).to(x).view(-1, 1, 1, 2)
        for distance in torch.arange(-length, length + 0.5, 1.0).tolist():
            shifted = sample(seeds, grid - distance * direction, padding="zeros")
            crystals = torch.maximum(crystals, shifted * (1 - abs(distance) / (length + 0.5)))
    return (0.1 + 0.35 * haze + 0.8 * crystals).clamp(0, 1)


def frost(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """The image dimmed under a seeded ice texture (:func:`frost_texture`)."""
    image_weight, frost_weight = FROST[level]
    return image_weight * x + frost_weight * frost_texture(x, rng)


def fog(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """A fractal haze added, rescaled to each image's maximum."""
    strength, decay = FOG[level]
    top = x.amax((1, 2, 3), keepdim=True)
    haze = plasma(len(x), *x.shape[-2:], decay, rng).to(x)
    return (x + strength * haze) * top / (top + strength)


def brightness(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """Raise the HSV value ``max(R, G, B)`` by the severity's amount: hue and saturation stay, so RGB scales."""
    value = x.amax(1, keepdim=True)
    raised = (value + BRIGHTNESS[level]).clamp(max=1)
    return torch.where(value > 0, x * raised / value.clamp_min(1e-12), raised.expand_as(x))


def _colour(x: Tensor, rgb: tuple[float, float, float]) -> Tensor:
    """``(1, C, 1, 1)`` colour for ``x``'s channels: ``rgb``, or its luma on one channel."""
    colour = torch.tensor(rgb, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return colour if x.shape[1] == 3 else gray(colour)


def spatter(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """Liquid drops: a smoothed Gaussian field thresholded into drops, water (severities 1-3: light added where the
    liquid is, in proportion to it) or mud (4-5: the image replaced by brown where the smoothed drops cover it).

    ``make_cifar_c.spatter`` also shades water drops with an embossed relief of their distance to the drops' edges
    (OpenCV's Canny edges, distance transform and histogram equalisation), which we leave out: on an 8x8 image the
    relief is a pixel or two. Smoothing lengths are scaled by :func:`spatial_scale`.
    """
    mean, std, sigma, threshold, spread, mud = SPATTER[level]
    b, _, h, w = x.shape
    scale = spatial_scale(h, w)
    taps = gaussian_taps(sigma)
    liquid = scaled_blur(mean + std * randn((b, 1, h, w), rng, x), taps.view(-1, 1) * taps, scale)
    liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)
    if not mud:
        drops = liquid / liquid.amax((2, 3), keepdim=True).clamp_min(1e-12) * spread
        return x + drops * _colour(x, SPATTER_WATER)
    taps = gaussian_taps(spread)
    cover = scaled_blur((liquid > threshold).to(x), taps.view(-1, 1) * taps, scale)
    cover = torch.where(cover < 0.8, torch.zeros_like(cover), cover)
    return x * (1 - cover) + _colour(x, SPATTER_MUD) * cover
