"""Which statistics BatchNorm layers normalise with during test-time training.

Policies (applied with forward pre-hooks on every BatchNorm-family layer that tracks running statistics; the layers
stay in eval mode, so dropout and the rest of the model are untouched):

* ``source``: the running statistics learned in training (nothing changes).
* ``batch``: the current batch's mean and (biased) variance, as in TENT (train-mode BatchNorm without running
  statistics). Gradients flow through them.
* ``mix``: ``alpha * source + (1 - alpha) * batch`` (Schneider et al. 2020; ``alpha = N / (N + n)`` for a prior
  strength ``N`` and batch size ``n``).
* ``ema``: running statistics updated as ``(1 - momentum) * running + momentum * batch`` and used at once; they
  carry over from batch to batch (continual adaptation).

A batch with a single value per channel (batch size 1 in ``BatchNorm1d``) has no batch variance: ``batch`` and
``mix`` use the source statistics for it and ``ema`` leaves the running statistics unchanged. A batch with
non-finite values never enters the ``ema`` statistics. At the end of the run (cleanup) ``batch`` and ``mix`` put the
source statistics back; ``ema`` leaves its statistics (restored with the model unless the adapted state is kept).
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ttc_lightning.checks import check_choice

NORM_POLICIES = ("source", "batch", "mix", "ema")


def _batch_stats(x: Tensor) -> tuple[Tensor, Tensor] | None:
    dims = [0, *range(2, x.ndim)]
    if x.numel() // x.shape[1] < 2:
        return None
    x = x.float()
    return x.mean(dims), x.var(dims, unbiased=False)


class NormStatistics:
    """A normalisation-statistics policy.

    Args:
        policy: ``source``, ``batch``, ``mix`` or ``ema``. Default ``"batch"``.
        alpha: weight of the source statistics for ``mix``, in ``[0, 1]``. Default ``0.5``.
        momentum: weight of each batch for ``ema``, in ``(0, 1]``. Default ``0.1``.
    """

    def __init__(self, policy: str = "batch", alpha: float = 0.5, momentum: float = 0.1) -> None:
        check_choice("norm", policy, NORM_POLICIES)
        if not 0 <= alpha <= 1:
            raise ValueError(f"`alpha`={alpha!r} must lie in [0, 1].")
        if not 0 < momentum <= 1:
            raise ValueError(f"`momentum`={momentum!r} must lie in (0, 1].")
        self.policy, self.alpha, self.momentum = policy, alpha, momentum

    def apply(self, module: nn.Module) -> Callable[[], None]:
        """Install the policy on ``module``'s BatchNorm layers; return the clean-up that removes it."""
        if self.policy == "source":
            return lambda: None
        layers = [
            m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
        ]
        sources = {m: (m.running_mean.detach().clone(), m.running_var.detach().clone()) for m in layers}
        handles = [m.register_forward_pre_hook(self._hook(sources[m])) for m in layers]

        def cleanup() -> None:
            for handle in handles:
                handle.remove()
            for m, (mean, var) in sources.items():
                if self.policy == "ema":  # keep the adapted statistics, without their autograd history
                    mean, var = m.running_mean, m.running_var
                m.running_mean, m.running_var = mean.detach().clone(), var.detach().clone()

        return cleanup

    def _hook(self, source: tuple[Tensor, Tensor]) -> Callable[[nn.Module, tuple], None]:
        def hook(m: nn.Module, args: tuple) -> None:
            stats = _batch_stats(args[0])
            if self.policy == "ema":
                if stats is None or not all(torch.isfinite(s).all() for s in stats):
                    return
                mean = (1 - self.momentum) * m.running_mean.detach() + self.momentum * stats[0]
                var = (1 - self.momentum) * m.running_var.detach() + self.momentum * stats[1]
            elif stats is None:
                mean, var = source
            elif self.policy == "batch":
                mean, var = stats
            else:
                mean = self.alpha * source[0] + (1 - self.alpha) * stats[0]
                var = self.alpha * source[1] + (1 - self.alpha) * stats[1]
            m.running_mean, m.running_var = mean.to(source[0].dtype), var.to(source[1].dtype)

        return hook
