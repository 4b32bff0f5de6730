"""``RandomAugment``: seeded AugMix-style random augmentation of image batches, in torch.

Serves the methods that need random views (MEMO's marginal entropy, CoTTA's augmentation-averaged teacher, the
draws of iterative inference's sampling mode). Every operation is range-agnostic, so it works on normalised inputs:
magnitudes of photometric operations are relative to each image's own mean and standard deviation.
"""

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ttc_lightning.checks import check_int, check_positive, check_range
from ttc_lightning.ops.seeding import seeded_generator

OPERATIONS = ("rotate", "shear", "translate", "scale", "hflip", "brightness", "contrast", "blur", "noise")


def check_image_batch(x: Any, owner: str, hint: str = "") -> None:
    """Raise ``ValueError`` unless ``x`` is an image batch ``(B, C, H, W)``, which ``owner`` needs (random views)."""
    if not isinstance(x, Tensor) or x.ndim != 4:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"type {type(x).__name__}"
        raise ValueError(f"{owner} needs an image batch (B, C, H, W); got an input of {got}.{hint}")


class RandomAugment:
    """Random views of an image batch ``(B, C, H, W)``, one independent draw per sample (AugMix, Hendrycks et al.).

    A draw mixes ``width`` chains of 1 to ``depth`` operations, drawn uniformly from :data:`OPERATIONS`, with
    ``Dirichlet(alpha)`` weights, and blends the mix with the original image by ``m ~ Beta(alpha, alpha)``. At
    ``severity`` 1 the largest magnitudes are: rotation 30 degrees, shear 0.3, translation 10% of the side, scale
    +-20%, brightness +-0.5 std, contrast x[0.5, 1.5], blur sigma 1 px (3x3 kernel), Gaussian noise 0.2 std.

    Args:
        severity: magnitude scale in ``(0, 1]``. Default ``1.0``.
        width: chains per draw. Default ``3``.
        depth: most operations per chain. Default ``3``.
        alpha: Dirichlet and Beta concentration. Default ``1.0``.
        seed: base seed; each process uses ``seed + rank`` (distinct draws per DDP rank, reproducible runs).
            Default ``0``.

    Raises:
        ValueError: ``severity`` is not in ``(0, 1]``, ``alpha`` not positive, or ``width``, ``depth`` or ``seed``
            not an integer of at least 1, 1 and 0.
    """

    def __init__(
        self, severity: float = 1.0, width: int = 3, depth: int = 3, alpha: float = 1.0, seed: int = 0
    ) -> None:
        self.severity = check_range("severity", severity, 0, 1, low_open=True)
        self.width, self.depth = check_int("width", width, 1), check_int("depth", depth, 1)
        self.alpha = check_positive("alpha", alpha)
        self.seed = check_int("seed", seed, 0)
        self.generator: torch.Generator | None = None

    def rng(self) -> torch.Generator:
        """The generator (seeded with ``seed + rank`` on first use)."""
        if self.generator is None:
            self.generator = seeded_generator(self.seed, per_rank=True)
        return self.generator

    def reseed(self) -> None:
        """Start the draws again from ``seed + rank`` (each Trainer stage does, so repeated runs match)."""
        self.generator = None

    def state_dict(self) -> dict[str, Any]:
        """The random state, for saving and resuming a run."""
        return {"generator": self.rng().get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng().set_state(state["generator"])

    def _uniform(self, n: int, low: float = -1.0, high: float = 1.0) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=self.rng())

    def __call__(self, x: Tensor) -> Tensor:
        """One random view of every sample of ``x``."""
        check_image_batch(x, "RandomAugment")
        batch = x.shape[0]
        rng = self.rng()
        weights = self._gamma(batch, self.width)  # Dirichlet and Beta draws as normalised Gamma draws
        weights = (weights / weights.sum(1, keepdim=True)).to(x)
        blend = self._gamma(batch, 2)
        blend = (blend[:, 0] / blend.sum(1)).to(x).view(-1, 1, 1, 1)
        mixed = torch.zeros_like(x)
        for chain in range(self.width):
            view = x
            steps = torch.randint(1, self.depth + 1, (batch,), generator=rng)
            for step in range(self.depth):
                ops = torch.randint(len(OPERATIONS), (batch,), generator=rng)
                ops[steps <= step] = -1  # this sample's chain is done
                view = self._apply(view, ops)
            mixed = mixed + weights[:, chain].view(-1, 1, 1, 1) * view
        return (1 - blend) * x + blend * mixed

    def _gamma(self, *shape: int) -> Tensor:
        return torch._standard_gamma(torch.full(shape, self.alpha), generator=self.rng())

    def _apply(self, x: Tensor, ops: Tensor) -> Tensor:
        out = x.clone()
        for index, name in enumerate(OPERATIONS):
            chosen = (ops == index).nonzero().flatten().to(x.device)
            if len(chosen):
                out[chosen] = getattr(self, f"_{name}")(x[chosen]).to(out.dtype)  # autocast may change it
        return out

    def _affine(self, x: Tensor, matrix: Tensor) -> Tensor:
        grid = F.affine_grid(matrix.to(x), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _matrix(self, n: int, linear: Tensor, shift: Tensor | None = None) -> Tensor:
        matrix = torch.zeros(n, 2, 3)
        matrix[:, :, :2] = linear
        if shift is not None:
            matrix[:, :, 2] = shift
        return matrix

    def _rotate(self, x: Tensor) -> Tensor:
        angle = self._uniform(len(x)) * math.radians(30) * self.severity
        cos, sin = angle.cos(), angle.sin()
        return self._affine(
            x, self._matrix(len(x), torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1))
        )

    def _shear(self, x: Tensor) -> Tensor:
        shear = self._uniform(len(x)) * 0.3 * self.severity
        linear = torch.eye(2).repeat(len(x), 1, 1)
        linear[:, 0, 1] = shear
        return self._affine(x, self._matrix(len(x), linear))

    def _translate(self, x: Tensor) -> Tensor:
        shift = torch.stack([self._uniform(len(x)), self._uniform(len(x))], 1) * 0.2 * self.severity
        return self._affine(x, self._matrix(len(x), torch.eye(2).repeat(len(x), 1, 1), shift))

    def _scale(self, x: Tensor) -> Tensor:
        factor = 1 + self._uniform(len(x)) * 0.2 * self.severity
        return self._affine(x, self._matrix(len(x), torch.eye(2) / factor.view(-1, 1, 1)))

    def _hflip(self, x: Tensor) -> Tensor:
        return x.flip(-1)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.mean((1, 2, 3), keepdim=True), x.std((1, 2, 3), keepdim=True)

    def _brightness(self, x: Tensor) -> Tensor:
        _, std = self._stats(x)
        return x + self._uniform(len(x)).to(x).view(-1, 1, 1, 1) * 0.5 * self.severity * std

    def _contrast(self, x: Tensor) -> Tensor:
        mean, _ = self._stats(x)
        factor = 1 + self._uniform(len(x)).to(x).view(-1, 1, 1, 1) * 0.5 * self.severity
        return mean + factor * (x - mean)

    def _blur(self, x: Tensor) -> Tensor:
        sigma = (self._uniform(len(x), 0.1, 1.0) * self.severity).to(x)
        taps = torch.exp(-torch.tensor([1.0, 0.0, 1.0], device=x.device).view(1, 3) / (2 * sigma.view(-1, 1) ** 2))
        taps = taps / taps.sum(1, keepdim=True)
        kernel = (taps.unsqueeze(2) * taps.unsqueeze(1)).repeat_interleave(x.shape[1], 0).unsqueeze(1)
        channels = x.shape[1]
        flat = F.pad(x.reshape(1, -1, *x.shape[-2:]), (1, 1, 1, 1), mode="replicate")
        return F.conv2d(flat, kernel, groups=len(x) * channels).reshape(x.shape)

    def _noise(self, x: Tensor) -> Tensor:
        _, std = self._stats(x)
        noise = torch.randn(x.shape, generator=self.rng()).to(x)
        return x + noise * 0.2 * self.severity * std
