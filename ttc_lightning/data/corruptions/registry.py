"""The corruption names, their families and :func:`corrupt`, which applies one by name."""

from collections.abc import Callable

import torch
from torch import Tensor

from ttc_lightning.checks import check_choice, check_int
from ttc_lightning.data.corruptions import blur, digital, noise, weather
from ttc_lightning.data.corruptions.common import check_images, check_severity

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
FAMILIES: dict[str, tuple[str, ...]] = {
    "noise": CORRUPTIONS[0:3],
    "blur": CORRUPTIONS[3:7],
    "weather": CORRUPTIONS[7:11],
    "digital": CORRUPTIONS[11:15],
}
#: CIFAR-10-C's extra corruptions, for validation only (saturate left out: see :mod:`ttc_lightning.data.corruptions`).
VALIDATION_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter")

#: Each corruption's function ``(images, severity - 1, generator) -> images`` (unclamped).
FUNCTIONS: dict[str, Callable[[Tensor, int, torch.Generator], Tensor]] = {
    "gaussian_noise": noise.gaussian_noise,
    "shot_noise": noise.shot_noise,
    "impulse_noise": noise.impulse_noise,
    "defocus_blur": blur.defocus_blur,
    "glass_blur": blur.glass_blur,
    "motion_blur": blur.motion_blur_corruption,
    "zoom_blur": blur.zoom_blur,
    "snow": weather.snow,
    "frost": weather.frost,
    "fog": weather.fog,
    "brightness": weather.brightness,
    "contrast": digital.contrast,
    "elastic_transform": digital.elastic_transform,
    "pixelate": digital.pixelate,
    "jpeg_compression": digital.jpeg_compression,
    "speckle_noise": noise.speckle_noise,
    "gaussian_blur": blur.gaussian_blur_corruption,
    "spatter": weather.spatter,
}


def corrupt(images: Tensor, name: str, severity: int, seed: int = 0) -> Tensor:
    """Apply the corruption ``name`` at ``severity`` to every image of a batch.

    Args:
        images: ``(B, C, H, W)`` floating-point images in ``[0, 1]``, ``C`` 1 or 3, ``H, W >= 4``, on any device.
        name: one of :data:`CORRUPTIONS` or :data:`VALIDATION_CORRUPTIONS`.
        severity: an integer from 1 to 5.
        seed: seed of the private generator behind the random draws (deterministic corruptions ignore it).
            Default ``0``.

    Returns:
        The corrupted batch: same shape, dtype and device, values in ``[0, 1]``.

    Raises:
        ValueError: ``images`` is not such a batch, or ``name``, ``severity`` or ``seed`` is not one of the allowed
            values.

    Example::

        shifted = corrupt(images, "gaussian_noise", severity=5, seed=0)
    """
    check_images(images)
    check_choice("name", name, CORRUPTIONS + VALIDATION_CORRUPTIONS)
    check_severity("severity", severity)
    check_int("seed", seed, 0)
    if len(images) == 0:
        return images.clone()
    work = images.to(torch.promote_types(images.dtype, torch.float32))
    rng = torch.Generator().manual_seed(seed)
    out = FUNCTIONS[name](work, severity - 1, rng)
    return out.clamp(0, 1).to(images.dtype)
