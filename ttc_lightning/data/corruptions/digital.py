"""Digital corruptions of CIFAR-10-C: contrast, elastic transform, pixelate and JPEG compression.

Geometry relative to the image (elastic warps, pixelate fractions) is kept as it is at every image size.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ttc_lightning.data.corruptions.common import rand
from ttc_lightning.data.corruptions.filters import gaussian_blur, pixel_grid, sample

# Parameter tables, one entry per severity (make_cifar_c.py unless said otherwise).
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # factor on the deviation from each image's channel means
# Ours: CIFAR-10-C's elastic table shrinks the affine part while the elastic part grows, so its distortion is not
# monotone in severity; here both grow. RMS displacement, smoothing sigma and affine jitter, in units of the side.
ELASTIC_TRANSFORM = (
    (0.02, 0.12, 0.01),
    (0.035, 0.11, 0.015),
    (0.05, 0.1, 0.02),
    (0.065, 0.09, 0.025),
    (0.08, 0.08, 0.03),
)
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # fraction of the side kept
JPEG_COMPRESSION = (80, 65, 58, 50, 40)  # quality
# The standard (ITU-T T.81 Annex K) quantisation tables at quality 50.
JPEG_LUMINANCE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
JPEG_CHROMINANCE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8,) * 4,
)


def contrast(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """Shrink each image's deviation from its channel means."""
    means = x.mean((2, 3), keepdim=True)
    return (x - means) * CONTRAST[level] + means


def elastic_transform(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """A random affine map (three control points jittered) composed with a smooth random displacement field."""
    b, _, h, w = x.shape
    side = min(h, w)
    rms, smooth, jitter = (value * side for value in ELASTIC_TRANSFORM[level])
    centre = torch.tensor([w / 2, h / 2], dtype=torch.float64)
    square = side / 3
    source = centre + square * torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    target = source + jitter * (torch.rand(b, 3, 2, generator=rng, dtype=torch.float64) * 2 - 1)
    # The map sending each jittered point back to its source: output(q) = input(inverse @ [q, 1]).
    inverse = torch.linalg.solve(torch.cat([target, torch.ones(b, 3, 1, dtype=torch.float64)], -1), source)
    field = gaussian_blur(rand((b, 2, h, w), rng, x) * 2 - 1, smooth)
    field = field / field.square().mean((1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12) * rms
    coords = pixel_grid(x) + field.permute(0, 2, 3, 1)
    coords = torch.cat([coords, torch.ones_like(coords[..., :1])], -1) @ inverse.to(x).unsqueeze(1)
    return sample(x, coords)


def pixelate_sizes(side: int) -> tuple[int, ...]:
    """Sides at severities 1-5 for an image side: ``int(side * fraction)`` (CIFAR-10-C), made strictly smaller at
    each severity (the fractions alone repeat sides on small images) but never below 2."""
    sizes: list[int] = []
    for fraction in PIXELATE:
        size = int(side * fraction)
        sizes.append(max(2, min(size, sizes[-1] - 1) if sizes else size))
    return tuple(sizes)


def _area(size: int, new_size: int) -> Tensor:
    """``(new_size, size)`` matrix of exact area resampling: each new pixel averages the old ones it overlaps."""
    edges = torch.arange(size + 1, dtype=torch.float64)
    width = size / new_size
    low = (torch.arange(new_size, dtype=torch.float64) * width).view(-1, 1)
    overlap = torch.minimum(low + width, edges[1:].view(1, -1)) - torch.maximum(low, edges[:-1].view(1, -1))
    return overlap.clamp_min(0) / width


def pixelate(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """Down to :func:`pixelate_sizes` and back up, both by exact area resampling (CIFAR-10-C upsamples with PIL's
    BOX filter, a nearest-neighbour lookup whose misaligned blocks make the damage non-monotone in severity)."""
    h, w = x.shape[-2:]
    rows = _area(pixelate_sizes(h)[level], h) @ _area(h, pixelate_sizes(h)[level])
    cols = _area(pixelate_sizes(w)[level], w) @ _area(w, pixelate_sizes(w)[level])
    return rows.to(x) @ x @ cols.T.to(x)


def jpeg_table(quality: int, base: tuple[tuple[int, ...], ...] = JPEG_LUMINANCE) -> Tensor:
    """The IJG quantisation table at ``quality``: ``floor((base * s + 50) / 100)`` clamped to ``[1, 255]``, with
    ``s = 5000 / quality`` below 50 and ``200 - 2 quality`` from 50."""
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return ((torch.tensor(base, dtype=torch.float64) * scale + 50) // 100).clamp(1, 255)


def _dct_matrix() -> Tensor:
    """The orthonormal 8-point DCT-II matrix ``D`` (coefficients ``D @ block @ D.T``)."""
    k = torch.arange(8, dtype=torch.float64).view(-1, 1)
    n = torch.arange(8, dtype=torch.float64).view(1, -1)
    matrix = torch.cos(math.pi * (2 * n + 1) * k / 16) * math.sqrt(2 / 8)
    matrix[0] /= math.sqrt(2)
    return matrix


def _jpeg_channel(levels: Tensor, table: Tensor) -> Tensor:
    """Quantise the 8x8-block DCT of ``(B, H, W)`` level-shifted pixels (H, W multiples of 8) with ``table``."""
    b, h, w = levels.shape
    blocks = levels.view(b, h // 8, 8, w // 8, 8).transpose(2, 3)
    dct = _dct_matrix().to(levels)
    table = table.to(levels)
    coefficients = dct @ blocks @ dct.T
    quantised = torch.round(coefficients / table) * table
    return (dct.T @ quantised @ dct).transpose(2, 3).reshape(b, h, w)


def jpeg_compression(x: Tensor, level: int, rng: torch.Generator) -> Tensor:
    """Baseline JPEG without entropy coding: 8-bit pixels, edge-padded to multiples of 8, blockwise DCT quantised
    with the standard luminance table (RGB: JFIF YCbCr, chrominance table on Cb, Cr; no chroma subsampling)."""
    quality = JPEG_COMPRESSION[level]
    h, w = x.shape[-2:]
    pixels = torch.round(x.double() * 255)
    pixels = F.pad(pixels, (0, -w % 8, 0, -h % 8), mode="replicate")
    if x.shape[1] == 3:
        r, g, b_ = pixels.unbind(1)
        y = 0.299 * r + 0.587 * g + 0.114 * b_
        cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b_
        cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b_
        y = _jpeg_channel(y - 128, jpeg_table(quality)) + 128
        cb = _jpeg_channel(cb - 128, jpeg_table(quality, JPEG_CHROMINANCE))
        cr = _jpeg_channel(cr - 128, jpeg_table(quality, JPEG_CHROMINANCE))
        pixels = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    else:
        pixels = (_jpeg_channel(pixels[:, 0] - 128, jpeg_table(quality)) + 128).unsqueeze(1)
    return (torch.round(pixels).clamp(0, 255) / 255)[..., :h, :w].to(x)
