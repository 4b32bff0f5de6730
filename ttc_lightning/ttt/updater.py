"""The updater of test-time training: optimizer, scheduler, clipping, grad scaler, non-finite skip and gradient sync.

:class:`Updates` groups the options of every update (``updates=Updates(...)`` in the presets); :class:`Updater`
takes the updates of one stage over the adapted parameters.
"""

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from ttc_lightning.checks import check_bool, check_choice, check_unused, is_default
from ttc_lightning.ttt.objectives import Loss
from ttc_lightning.ttt.sync import average_gradients

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]
CLIP_MODES = ("norm", "value")


def check_threshold(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a non-negative number or ``None``."""
    if value is not None and (isinstance(value, bool) or not (isinstance(value, int | float) and value >= 0)):
        raise ValueError(f"`{name}`={value!r} must be a non-negative number or None.")


@dataclass(frozen=True)
class Updates:
    """How every update of test-time training is taken (the ``updates`` option of the gradient presets).

    Args:
        scheduler: a factory ``optimizer -> LR scheduler``, built with each optimizer and stepped after every update
            (a warm-up such as ``LinearLR`` sets the first update's rate, so it acts even when each optimizer takes one
            update). Default ``None``.
        clip_grad: gradient clipping threshold, or ``None``. Default ``None``.
        clip_mode: ``"norm"`` (total L2 norm of the adapted parameters) or ``"value"``; needs ``clip_grad``.
            Default ``"norm"``.
        tol: stop a batch's steps early when the loss changes by less than ``tol`` between steps; needs
            ``steps >= 3`` (the earliest it can spare a step is after the second). Default ``None``.
        sync: keep the processes of a multi-process run in step: every update averages the gradients of all ranks
            (weighted by their samples in the loss) and every data-dependent decision is all-reduced, so the adapted
            parameters stay identical across ranks; ranks that run out of batches keep answering until all are done
            (see :mod:`~ttc_lightning.ttt.sync`). Refused at the start of a stage that runs on one process. Default
            ``False``: each rank adapts on its own shard.

    Raises:
        TypeError: for a ``scheduler`` that is not callable.
        ValueError: for a bad value, or ``clip_mode`` without ``clip_grad``.
    """

    scheduler: SchedulerFactory | None = None
    clip_grad: float | None = None
    clip_mode: str = "norm"
    tol: float | None = None
    sync: bool = False

    def __post_init__(self) -> None:
        if self.scheduler is not None and not callable(self.scheduler):
            raise TypeError(
                f"`updates.scheduler` must be a factory optimizer -> LR scheduler or None; got {self.scheduler!r}."
            )
        check_choice("updates.clip_mode", self.clip_mode, CLIP_MODES)
        check_threshold("updates.clip_grad", self.clip_grad)
        check_threshold("updates.tol", self.tol)
        check_bool("updates.sync", self.sync)
        if self.clip_grad is None:
            why = "it says how `updates.clip_grad` clips the gradients, and clip_grad=None"
            check_unused("updates.clip_mode", self.clip_mode, "norm", why, "Set `updates.clip_grad` or drop it")

    def given(self) -> list[str]:
        """The options set to other values than their defaults, as ``updates.<name>``."""
        return [f"updates.{f.name}" for f in fields(self) if not is_default(getattr(self, f.name), f.default)]


class Updater:
    """Takes the updates of one stage: the optimizer (and scheduler) over the adapted parameters, the gradients of a
    loss (sample-weighted and all-reduced across ranks with ``sync``), the skip of non-finite ones, clipping and the
    step (through a private grad scaler under ``16-mixed``).

    Args:
        factory: the optimizer factory.
        updates: the update options.
        owner: the name warnings and errors give (the preset's).

    Raises:
        TypeError: for a ``factory`` that is not callable.
    """

    def __init__(self, factory: OptimizerFactory, updates: Updates, owner: str) -> None:
        if not callable(factory):
            raise TypeError(f"`optimizer` must be a factory params -> Optimizer (functools.partial); got {factory!r}.")
        self.factory, self.options, self.owner = factory, updates, owner
        self.params: list[nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.scaler: torch.amp.GradScaler | None = None
        self.synced = False
        self.clear()

    def clear(self) -> None:
        """Zero the figures: updates taken, updates skipped, backward passes."""
        self.updates = self.skipped = self.backwards = 0

    def start(self, params: list[nn.Parameter], scaler: "torch.amp.GradScaler | None", synced: bool) -> None:
        """Begin a stage over ``params`` (``synced``: all-reduce gradients and decisions across ranks)."""
        self.params, self.scaler, self.synced = params, scaler, synced
        self.clear()
        self.renew()

    def renew(self) -> None:
        """A fresh optimizer (and scheduler) over the adapted parameters.

        Raises:
            ValueError: when the factory fails.
            TypeError: when it returns no torch optimizer.
        """
        try:
            optimizer = self.factory(self.params)
        except Exception as error:
            raise ValueError(
                f"`optimizer` factory {self.factory!r} failed on the {len(self.params)} adapted parameters: {error}"
            ) from error
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"`optimizer` factory returned {type(optimizer).__name__}, not a torch Optimizer.")
        self.optimizer = optimizer
        self.scheduler = None if self.options.scheduler is None else self.options.scheduler(optimizer)

    def backward(self, loss: Loss, batch_size: int) -> float | None:
        """Fill the adapted parameters' gradients from ``loss``; return the loss value to record, or ``None`` for no
        update (no sample kept, or a non-finite loss, which is counted as skipped).

        Raises:
            ValueError: for a finite loss without a gradient.
        """
        value = loss.value.detach().item()
        finite = math.isfinite(value)
        weight = float(loss.kept.sum()) if loss.kept is not None else float(batch_size)
        if finite and weight > 0:
            if not loss.value.requires_grad:
                raise ValueError(
                    "The test-time objective returned a loss without a gradient: it must be computed from the model's "
                    "output without detaching it, and `params` must select parameters that output depends on."
                )
            self.backwards += 1
            (loss.value if self.scaler is None else self.scaler.scale(loss.value)).backward()
        if self.synced:
            average, bad = average_gradients(self.params, weight, value, bad=not finite and weight > 0)
            if bad:
                self.skip("loss")
            return average
        if weight == 0:  # no sample passed the filters: nothing to learn from
            return None
        if not finite:
            self.skip("loss")
            return None
        return value

    def step(self, value: float | None) -> bool:
        """Take the update the gradients ask for (``value``: what :meth:`backward` returned); return whether it was
        taken (not for ``None``, nor for non-finite gradients, which are counted as skipped)."""
        assert self.optimizer is not None
        if value is None:  # nothing to learn from, a non-finite loss, or the preset decided against an update
            self.optimizer.zero_grad(set_to_none=True)
            return False
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads and not all(torch.isfinite(g).all() for g in grads):
            if self.scaler is not None:  # an fp16 overflow: lower the scale, as GradScaler.step would
                self.scaler.update()
            self.skip("gradients")
            return False
        if self.options.clip_grad is not None:
            clip = nn.utils.clip_grad_norm_ if self.options.clip_mode == "norm" else nn.utils.clip_grad_value_
            clip(self.params, self.options.clip_grad)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.updates += 1
        return True

    def skip(self, what: str) -> None:
        """Drop the gradients of an update that will not be taken for non-finite ``what``; warn the first time."""
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        if self.skipped == 0:
            rank_zero_warn(f"{self.owner}: non-finite {what} on a batch; skipped its update (model untouched).")
        self.skipped += 1

    def state(self) -> dict[str, Any]:
        """The optimizer's and scheduler's state and the figures."""
        assert self.optimizer is not None
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "figures": (self.updates, self.skipped, self.backwards),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state`."""
        assert self.optimizer is not None
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.updates, self.skipped, self.backwards = state["figures"]
