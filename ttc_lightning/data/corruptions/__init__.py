"""The 15 CIFAR-10-C corruptions (Hendrycks & Dietterich, 2019) at severities 1-5, in torch, on image batches, and
three of its four extra (validation) corruptions.

Parameters follow ``make_cifar_c.py``; the tables of each family's module say where and why ours differ. Blur
lengths (defocus and glass kernels, glass jumps, motion and snow trails, zoom streaks) are CIFAR-10-C's at 32 px
times :func:`spatial_scale`, resampled exactly so that fractional sizes still act; geometry relative to the image
(fog and frost patterns, elastic warps, pixelate fractions) is kept as it is. Images with a side below 32 px (MNIST-C
style) take the noise magnitudes MNIST-C takes (ImageNet-C's): CIFAR-10-C's barely touch them.

Random draws come from a private CPU ``torch.Generator`` seeded with ``seed`` (never the global RNG) and are moved to
the images' device, so a seed gives the same corruption on every device. Every sample gets its own draws, which
depend on the batch shape but not on the other samples' values (shot noise aside: Poisson sampling takes a
value-dependent number of draws). One seed draws the same underlying noise at every severity (shot noise aside), so
severities differ in strength only.

The extra corruptions (:data:`VALIDATION_CORRUPTIONS`: speckle noise, Gaussian blur, spatter) are CIFAR-10-C's
held-out set for choosing hyperparameters without looking at the 15 reported ones; they are never part of
:data:`CORRUPTIONS`. Its fourth extra corruption, saturate, scales the HSV saturation and does nothing to a
one-channel image, which has none: it is left out rather than replaced by an invention of ours.

Layout: :mod:`~.registry` (names, families, :func:`corrupt`), one module per family (:mod:`~.noise`, :mod:`~.blur`,
:mod:`~.weather`, :mod:`~.digital`; each validation corruption with its family), :mod:`~.filters` (the resampling
they share) and :mod:`~.common` (checks, spatial scale, random draws).
"""

from ttc_lightning.data.corruptions.common import SEVERITIES, check_images, check_severity, spatial_scale
from ttc_lightning.data.corruptions.registry import CORRUPTIONS, FAMILIES, VALIDATION_CORRUPTIONS, corrupt

__all__ = [
    "CORRUPTIONS",
    "FAMILIES",
    "SEVERITIES",
    "VALIDATION_CORRUPTIONS",
    "check_images",
    "check_severity",
    "corrupt",
    "spatial_scale",
]
