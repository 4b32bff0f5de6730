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
from typing_extensions import override

from ttc_lightning.checks import check_choice, check_range, check_unused

NORM_POLICIES = ("source", "batch", "mix", "ema")


def running_statistics(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``module`` with running statistics (what the statistics policies act on)."""
    return [
        m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    ]


def _normalise(x: Tensor, mean: Tensor, var: Tensor, m: nn.modules.batchnorm._BatchNorm) -> Tensor:
    shape = (1, -1) + (1,) * (x.ndim - 2)
    out = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + m.eps)
    if m.weight is not None:
        out = out * m.weight.view(shape) + m.bias.view(shape)
    return out.to(x.dtype)


class NormStatistics:
    """A normalisation-statistics policy (``norm=NormStatistics("mix", alpha=0.9)``; ``norm="mix"`` is the policy
    with its default weights).

    Args:
        policy: ``source``, ``batch``, ``mix`` or ``ema``. Default ``"batch"``.
        alpha: weight of the source statistics for ``mix``, in ``[0, 1]`` (refused with another policy). Default
            ``0.5``.
        momentum: weight of each batch for ``ema``, in ``(0, 1]`` (refused with another policy). Default ``0.1``.

    Raises:
        ValueError: for an unknown policy, a weight out of range, or a weight of another policy than ``policy``.
    """

    def __init__(self, policy: str = "batch", alpha: float = 0.5, momentum: float = 0.1) -> None:
        check_choice("norm", policy, NORM_POLICIES)
        self.policy = policy
        self.alpha = check_range("alpha", alpha, 0, 1)
        self.momentum = check_range("momentum", momentum, 0, 1, low_open=True)
        if policy != "mix":
            why = f"it weighs the source statistics of norm='mix', and norm={policy!r}"
            check_unused("alpha", alpha, 0.5, why, "Set norm='mix' or drop it")
        if policy != "ema":
            why = f"it weighs each batch in the running statistics of norm='ema', and norm={policy!r}"
            check_unused("momentum", momentum, 0.1, why, "Set norm='ema' or drop it")

    @classmethod
    def of(cls, norm: "str | NormStatistics") -> "NormStatistics":
        """``norm`` itself, or the policy it names with its default weights."""
        return norm if isinstance(norm, NormStatistics) else cls(norm)

    def given(self) -> dict[str, object]:
        """The arguments that differ from the defaults, by name."""
        values = (("norm", self.policy, "batch"), ("alpha", self.alpha, 0.5), ("momentum", self.momentum, 0.1))
        return {name: value for name, value, default in values if value != default}

    @override
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, NormStatistics):
            return NotImplemented
        return (self.policy, self.alpha, self.momentum) == (other.policy, other.alpha, other.momentum)

    @override
    def __hash__(self) -> int:
        return hash((self.policy, self.alpha, self.momentum))

    @override
    def __repr__(self) -> str:
        weights = "".join(f", {name}={value!r}" for name, value in self.given().items() if name != "norm")
        return f"NormStatistics({self.policy!r}{weights})"

    def apply(self, module: nn.Module, required: bool = False) -> Callable[[], None]:
        """Install the policy on ``module``'s BatchNorm layers; return the clean-up that removes it.

        With ``required`` (statistics-only adaptation), a model without BatchNorm layers is an error.
        """
        if self.policy == "source":
            return lambda: None
        layers = running_statistics(module)
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
