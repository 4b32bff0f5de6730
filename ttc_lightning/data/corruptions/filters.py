"""Filters and resampling shared by the blur, weather and digital corruptions: convolution with mirrored borders,
Gaussian kernels, kernels scaled to the image size, bilinear sampling, zoom and motion blur."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def convolve(x: Tensor, kernel: Tensor) -> Tensor:
    """Convolve every channel with a centred odd-sized 2-D ``kernel``, mirroring at the borders; a kernel wider than
    the image is cut to it and renormalised."""
    b, c, h, w = x.shape
    rows = max(0, (kernel.shape[0] - 1) // 2 - (h - 1))
    cols = max(0, (kernel.shape[1] - 1) // 2 - (w - 1))
    kernel = kernel[rows : kernel.shape[0] - rows, cols : kernel.shape[1] - cols]
    kernel = kernel / kernel.sum()
    kh, kw = kernel.shape
    flat = F.pad(x.reshape(b * c, 1, h, w), (kw // 2, kw // 2, kh // 2, kh // 2), mode="reflect")
    return F.conv2d(flat, kernel.to(x).view(1, 1, kh, kw)).view(b, c, h, w)


def gaussian_taps(sigma: float) -> Tensor:
    """scipy's ``gaussian_filter`` weights (``skimage.filters.gaussian``): truncated at ``int(4 sigma + 0.5)``."""
    radius = int(4 * sigma + 0.5)
    taps = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2) / (2 * sigma**2))
    return taps / taps.sum()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur with :func:`gaussian_taps`."""
    taps = gaussian_taps(sigma)
    return convolve(convolve(x, taps.view(1, -1)), taps.view(-1, 1))


def resampling(taps: int, scale: float) -> Tensor:
    """``(P, taps)`` matrix moving a centred kernel of ``taps`` unit boxes onto a grid ``1 / scale`` times finer.

    Tap ``i`` of the kernel (offset ``i - taps // 2``) becomes a box of side ``scale`` centred at ``scale`` times
    its offset; row ``p`` holds the share of that box falling in output pixel ``p``. ``R @ K @ R.T`` is the kernel
    ``K`` scaled by ``scale`` with its area kept exactly: fractional scales still move weight to the neighbours.
    """
    half = taps // 2
    centres = (torch.arange(taps, dtype=torch.float64) - half) * scale
    reach = max(0, math.ceil(scale * (half + 0.5) - 0.5 - 1e-9))
    pixels = torch.arange(-reach, reach + 1, dtype=torch.float64).view(-1, 1)
    high = torch.minimum(centres + scale / 2, pixels + 0.5)
    low = torch.maximum(centres - scale / 2, pixels - 0.5)
    return (high - low).clamp_min(0) / scale


def scaled_blur(x: Tensor, kernel: Tensor, scale: float) -> Tensor:
    """Convolve with the 2-D reference ``kernel`` scaled by ``scale`` (see :func:`resampling`)."""
    rows, cols = resampling(kernel.shape[0], scale), resampling(kernel.shape[1], scale)
    return convolve(x, rows @ kernel @ cols.T)


def pixel_grid(x: Tensor) -> Tensor:
    """``(H, W, 2)`` continuous ``(x, y)`` coordinates of the pixel centres."""
    h, w = x.shape[-2:]
    ys = torch.arange(h, dtype=x.dtype, device=x.device) + 0.5
    xs = torch.arange(w, dtype=x.dtype, device=x.device) + 0.5
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)


def sample(x: Tensor, coords: Tensor, padding: str = "reflection") -> Tensor:
    """Bilinear samples of ``x`` at ``(B, H, W, 2)`` pixel coordinates ``(x, y)``."""
    h, w = x.shape[-2:]
    size = torch.tensor([w, h], dtype=x.dtype, device=x.device)
    grid = coords / size * 2 - 1
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def zoom(x: Tensor, factor: float) -> Tensor:
    """Magnify the centre of every image by ``factor >= 1`` (CIFAR-10-C's ``clipped_zoom``, bilinear)."""
    centre = torch.tensor([x.shape[-1] / 2, x.shape[-2] / 2], dtype=x.dtype, device=x.device)
    coords = centre + (pixel_grid(x) - centre) / factor
    return sample(x, coords.expand(len(x), -1, -1, -1))


def motion_blur(x: Tensor, sigma: float, angle: Tensor) -> Tensor:
    """Average of copies shifted along each sample's ``angle`` (radians) with one-sided Gaussian weights.

    ImageMagick's motion blur as ``make_cifar_c.py`` uses it, with sub-pixel steps so that small sigmas still blur.
    """
    step = min(1.0, sigma / 2)
    length = min(3 * sigma, max(x.shape[-2:]) - 1)
    distances = torch.arange(0, length + step / 2, step, dtype=torch.float64)
    weights = torch.exp(-(distances**2) / (2 * sigma**2))
    weights = (weights / weights.sum()).tolist()
    direction = torch.stack([angle.cos(), angle.sin()], -1).to(x).view(-1, 1, 1, 2)
    grid = pixel_grid(x)
    out = torch.zeros_like(x)
    for distance, weight in zip(distances.tolist(), weights, strict=True):
        out = out + weight * sample(x, grid - distance * direction, padding="border")
    return out
