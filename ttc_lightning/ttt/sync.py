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

Every collective of the library (these rounds and :class:`~ttc_lightning.PredictionWriter`'s broadcasts) returns only
once the process group has let go of its tensors (:func:`settle`). A gloo worker thread marks a collective complete
before it drops its own reference to the work and its tensors, so the call can return to Python while that thread
still holds them (a quarter of 2-rank gloo all-reduces on a loaded 2-core machine, letting go up to 9 ms later:
``held_after_return`` in benchmarks/results/ddp_two_predicts.json, from tests/ddp_two_predicts.py). The tensors'
Python objects are then freed on that thread, which must take the GIL. A thread still waiting for the GIL when the
interpreter starts to shut down (the writer's broadcast is the last collective of a script that ends with
``trainer.predict``, and Lightning never destroys a gloo process group) is ended by CPython with ``pthread_exit``
once it gets it, and that unwind through C++ ``noexcept`` frames can abort the process with ``terminate called
without an active exception``.
"""

import pickle
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

#: Most input dimensions the status round can describe.
MAX_DIMS = 8
#: Seconds :func:`settle` waits for the process group to let go of a collective's tensors before it warns.
SETTLE_TIMEOUT_S = 30.0


def settle(tensors: list[Tensor], counts: list[int]) -> None:
    """Return once no tensor of ``tensors`` has more C++ references than ``counts`` (taken before the collective).

    The extra references are the process group's (its worker thread's work object); waiting for them means that
    no thread of the process group frees a tensor of ours after the collective returns. Sleeps release the GIL.
    Not with NCCL: Lightning destroys NCCL groups at exit, while the interpreter is whole, and NCCL's watchdog keeps
    a work and its tensors until it next polls, so waiting would slow every round.
    """
    if dist.get_backend() == "nccl":
        return
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while any(t._use_count() > count for t, count in zip(tensors, counts, strict=True)):
        if time.monotonic() > deadline:
            warnings.warn(
                f"ttc_lightning: the process group still references a finished collective's tensors after "
                f"{SETTLE_TIMEOUT_S:.0f} s; continuing without waiting for them.",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        time.sleep(1e-4)


def all_reduce(tensor: Tensor) -> None:
    """``dist.all_reduce(tensor)`` (sum, in place), returning once the process group has let go of ``tensor``."""
    count = tensor._use_count()
    dist.all_reduce(tensor)
    settle([tensor], [count])


def _broadcast(tensor: Tensor, src: int) -> None:
    count = tensor._use_count()
    dist.broadcast(tensor, src)
    settle([tensor], [count])


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled), like Lightning's ``strategy.broadcast``, returning once the
    process group has let go of the tensors it was sent in. Without an initialised process group: ``obj``."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    payload = pickle.dumps(obj) if dist.get_rank() == src else b""
    size = torch.tensor([len(payload)], dtype=torch.long, device=device)
    _broadcast(size, src)
    if dist.get_rank() == src:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device, copy=True)
    else:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    _broadcast(data, src)
    return obj if dist.get_rank() == src else pickle.loads(data.cpu().numpy().tobytes())


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
    all_reduce(message)
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
    all_reduce(message)
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


def template(x: Tensor, args: tuple, kwargs: dict) -> tuple[Tensor, list, dict]:
    """The batch ``x`` (with its arguments) cut to no rows: what :func:`drain` runs once this rank has no data."""
    rows = len(x)
    return x[:0], [a[:0] if isinstance(a, Tensor) and a.ndim >= 1 and a.shape[0] == rows else a for a in args], kwargs


def drain(
    device: torch.device, template: tuple[Tensor, list, dict] | None, step: Callable[[Tensor, tuple, dict], None]
) -> None:
    """Answer the other ranks' collectives until no rank has data left: each round, :func:`status` (no data here),
    then ``step`` on an empty batch (``template``, the rank's last batch cut to no rows, or zeros of the shape
    another rank reports)."""
    while True:
        ranks, shape = status(False, None, device)
        if ranks == 0:
            return
        x, args, kwargs = template or (torch.zeros((0, *shape), device=device), [], {})
        step(x, tuple(args), kwargs)
