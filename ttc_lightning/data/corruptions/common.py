"""What every corruption family shares: the severities, the image checks, the spatial scale of blur lengths, the
random draws and the grey version of an image."""

import torch
from torch import Tensor

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
REFERENCE_SIDE = 32  # CIFAR-10-C's image side, at which pixel parameters are taken as they are


def spatial_scale(height: int, width: int) -> float:
    """Factor on CIFAR-10-C's blur lengths for a ``height x width`` image: ``side / 32`` for a shorter side of at
    least 32 px, ``(side / 32) ** 0.25`` below.

    Small images are coarse renderings whose strokes are still a pixel or two wide, so blurs a quarter as long on an
    8x8 digit would be invisible; the fourth root (0.71 at 8 px, 0.97 at 28 px) gives a small digits CNN source
    errors at severity 5 like a CIFAR-10 network's on CIFAR-10-C.
    """
    ratio = min(height, width) / REFERENCE_SIDE
    return ratio if ratio >= 1 else ratio**0.25


def is_small(x: Tensor) -> bool:
    """Whether the images have a side below 32 px (MNIST-C style: ImageNet-C's noise magnitudes)."""
    return min(x.shape[-2:]) < REFERENCE_SIDE


def check_images(images: Tensor, name: str = "images") -> None:
    """Raise ``ValueError`` unless ``images`` is a float ``(B, C, H, W)`` batch, C 1 or 3, H, W >= 4, in [0, 1]."""
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor; got {_describe(images)}.")
    if images.ndim != 4 or images.shape[1] not in (1, 3) or min(images.shape[-2:]) < 4:
        raise ValueError(
            f"`{name}` must have shape (B, C, H, W) with C 1 or 3 and H, W >= 4; got {tuple(images.shape)}."
        )
    if images.numel() and not bool(((images >= 0) & (images <= 1)).all()):
        low, high = images.min().item(), images.max().item()
        raise ValueError(f"`{name}` must lie in [0, 1]; got values in [{low}, {high}] (or NaN).")


def check_severity(name: str, severity: object) -> int:
    """Return ``severity`` if it is an ``int`` from 1 to 5; raise ``ValueError`` naming ``name`` otherwise."""
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"`{name}`={severity!r} is not supported; allowed: integers 1 to 5.")
    return severity


def _describe(value: object) -> str:
    return f"{value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__


# Random draws: on the CPU generator, then moved to the images' device and dtype.


def randn(shape: tuple[int, ...], rng: torch.Generator, like: Tensor) -> Tensor:
    """Standard normal draws of ``shape`` from ``rng`` (CPU), on ``like``'s device and dtype."""
    return torch.randn(shape, generator=rng).to(like)


def rand(shape: tuple[int, ...], rng: torch.Generator, like: Tensor) -> Tensor:
    """Uniform ``[0, 1)`` draws of ``shape`` from ``rng`` (CPU), on ``like``'s device and dtype."""
    return torch.rand(shape, generator=rng).to(like)


def gray(x: Tensor) -> Tensor:
    """Luma ``0.299 R + 0.587 G + 0.114 B`` as ``(B, 1, H, W)``; a 1-channel image is its own grey version."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)
