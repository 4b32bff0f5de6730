"""Which statistics BatchNorm layers normalise with during test-time training.

Policies (each BatchNorm-family layer that tracks running statistics gets a replacement ``forward`` for the run;
the layers stay in eval mode, so dropout and the rest of the model are untouched):

* ``source``: the running statistics learned in training (nothing changes).
* ``batch``: the current batch's mean and (biased) variance, exactly as train-mode BatchNorm without running
  statistics does (TENT). Gradients flow through them; the running statistics are left alone.
* ``mix``: ``alpha * source + (1 - alpha) * batch`` (Schneider et al. 2020; ``alpha = N / (N + n)`` for a prior
  strength ``N`` and batch size ``n``).
* ``ema``: running statistics updated as ``(1 - momentum) * running + momentum * batch`` and used at once; they
  carry over from batch to batch (continual adaptation) and are restored with the model unless the adapted state
  is kept.

A batch with a single value per channel (batch size 1 in ``BatchNorm1d``) has no batch variance: every policy
uses the running statistics for it (the source ones for ``batch`` and ``mix``). A batch with non-finite values
never enters the ``ema`` statistics.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttc_lightning.checks import check_choice, check_range

NORM_POLICIES = ("source", "batch", "mix", "ema")


def _normalise(x: Tensor, mean: Tensor, var: Tensor, m: nn.modules.batchnorm._BatchNorm) -> Tensor:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    out = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + m.eps)
    if m.weight is not None:
        out = out * m.weight.view(shape) + m.bias.view(shape)
    return out.to(x.dtype)


class NormStatistics:
    """A normalisation-statistics policy.

    Args:
        policy: ``source``, ``batch``, ``mix`` or ``ema``. Default ``"batch"``.
        alpha: weight of the source statistics for ``mix``, in ``[0, 1]``. Default ``0.5``.
        momentum: weight of each batch for ``ema``, in ``(0, 1]``. Default ``0.1``.
    """

    def __init__(self, policy: str = "batch", alpha: float = 0.5, momentum: float = 0.1) -> None:
        check_choice("norm", policy, NORM_POLICIES)
        self.policy = policy
        self.alpha = check_range("alpha", alpha, 0, 1)
        self.momentum = check_range("momentum", momentum, 0, 1, low_open=True)

    def apply(self, module: nn.Module, required: bool = False) -> Callable[[], None]:
        """Install the policy on ``module``'s BatchNorm layers; return the clean-up that removes it.

        With ``required`` (statistics-only adaptation), a model without BatchNorm layers is an error.
        """
        if self.policy == "source":
            return lambda: None
        layers = [
            m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
        ]
        if required and not layers:
            raise ValueError(
                f"`norm`={self.policy!r}: {type(module).__name__} has no BatchNorm layer with running statistics to "
                "adapt; use norm='source' (or a model with BatchNorm)."
            )
        for m in layers:
            m.forward = self._forward(m)

        def cleanup() -> None:
            for m in layers:
                del m.forward

        return cleanup

    def _forward(self, m: nn.modules.batchnorm._BatchNorm) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            dims = [0, *range(2, x.ndim)]
            if x.numel() // x.shape[1] < 2:  # no batch variance: running statistics
                return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
            if self.policy == "batch":
                return F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
            mean, var = x.float().mean(dims), x.float().var(dims, unbiased=False)
            weight = self.alpha if self.policy == "mix" else 1 - self.momentum
            mean = weight * m.running_mean + (1 - weight) * mean
            var = weight * m.running_var + (1 - weight) * var
            if self.policy == "ema":
                if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
                    return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
                with torch.no_grad():
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
            return _normalise(x, mean, var, m)

        return forward
