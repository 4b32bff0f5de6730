"""Collectives that keep test-time training in step across processes (``TestTimeTraining(sync=True)``).

Schedule, the same on every rank so that no collective is ever left waiting:

* one *status* all-reduce per batch: whether the rank still has data, and the shape of its input (so that a rank
  without data of its own can run the same code on an empty batch);
* one *gradient* all-reduce per backward pass: the adapted parameters' gradients weighted by the number of samples
  in the rank's loss, that weight, the weighted loss and a flag for a non-finite loss. Every rank then applies the
  same averaged gradients, or skips when any rank saw a non-finite loss or no rank kept a sample, so decisions that
  depend on data (skip, filter, convergence, collapse resets) come from all-reduced values.

A rank that runs out of batches keeps answering: it runs the adaptation step on an empty batch (contributing
nothing) until no rank has data left.
"""

import torch
import torch.distributed as dist
from torch import Tensor, nn

#: Most input dimensions the status round can describe.
MAX_DIMS = 8


def distributed() -> bool:
    """Whether several processes take part (an initialised process group of more than one rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def status(active: bool, x: Tensor | None, device: torch.device) -> tuple[int, tuple[int, ...]]:
    """All-reduce of (ranks with data, per-sample input shape); returns both (shape from the ranks with data)."""
    message = torch.zeros(2 + MAX_DIMS, dtype=torch.float64, device=device)
    if active:
        assert x is not None
        if x.ndim > MAX_DIMS:
            raise ValueError(f"sync=True supports inputs of up to {MAX_DIMS} dimensions; got {x.ndim}.")
        message[0] = 1
        message[1] = x.ndim
        message[2 : 2 + x.ndim - 1] = torch.tensor(x.shape[1:], dtype=torch.float64)
    dist.all_reduce(message)
    ranks = int(message[0].item())
    if ranks == 0:
        return 0, ()
    ndim = round(message[1].item() / ranks)
    return ranks, tuple(round(v / ranks) for v in message[2 : 2 + ndim - 1].tolist())


def average_gradients(params: list[nn.Parameter], weight: float, value: float, bad: bool) -> tuple[float | None, bool]:
    """Replace every rank's gradients with the weighted average over ranks.

    Returns the weighted mean loss (``None`` when the update must be skipped: a non-finite loss on some rank, or no
    sample on any) and whether some rank saw a non-finite loss.
    """
    device = params[0].device
    usable = weight > 0 and not bad
    flat = [
        (p.grad * weight).flatten() if usable and p.grad is not None else torch.zeros(p.numel(), device=device)
        for p in params
    ]
    extras = torch.tensor([weight if usable else 0.0, value * weight if usable else 0.0, float(bad)], device=device)
    message = torch.cat([*[f.to(torch.float64) for f in flat], extras.to(torch.float64)])
    dist.all_reduce(message)
    total, weighted_value, bad_ranks = message[-3:].tolist()
    if bad_ranks > 0 or total == 0:
        for p in params:
            p.grad = None
        return None, bad_ranks > 0
    offset = 0
    for p in params:
        p.grad = (message[offset : offset + p.numel()] / total).view_as(p).to(p.dtype)
        offset += p.numel()
    return weighted_value / total, False
