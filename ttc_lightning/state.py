"""Snapshot and bitwise restore of a module's parameters, buffers, modes and ``requires_grad`` flags."""

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class ModuleSnapshot:
    """What a module looked like at one moment.

    ``tensors`` holds clones of every parameter and buffer (``None`` when not captured, which is cheap and enough
    for strategies that never change the model). Buffers that are ``None`` (e.g. dropped running statistics) are
    recorded as such and restored as such.
    """

    modes: dict[str, bool]
    requires_grad: dict[str, bool]
    tensors: dict[str, Tensor | None] | None

    @classmethod
    def capture(cls, module: nn.Module, tensors: bool = True) -> "ModuleSnapshot":
        """Record ``module``; clone its parameters and buffers only when ``tensors`` is true."""
        with torch.no_grad():
            saved = None
            if tensors:
                saved = {name: p.detach().clone() for name, p in module.named_parameters(remove_duplicate=False)}
                for prefix, sub in module.named_modules(remove_duplicate=False):
                    for name, buffer in sub._buffers.items():
                        key = f"{prefix}.{name}" if prefix else name
                        saved[key] = None if buffer is None else buffer.detach().clone()
        return cls(
            modes={name: sub.training for name, sub in module.named_modules(remove_duplicate=False)},
            requires_grad={name: p.requires_grad for name, p in module.named_parameters(remove_duplicate=False)},
            tensors=saved,
        )

    def restore(self, module: nn.Module) -> None:
        """Put ``module`` back exactly as captured (values bitwise, modes, ``requires_grad``)."""
        for name, sub in module.named_modules(remove_duplicate=False):
            if name in self.modes:
                sub.training = self.modes[name]
        params = dict(module.named_parameters(remove_duplicate=False))
        for name, flag in self.requires_grad.items():
            params[name].requires_grad_(flag)
        if self.tensors is None:
            return
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.tensors[name])
                p.grad = None
            for prefix, sub in module.named_modules(remove_duplicate=False):
                for name in list(sub._buffers):
                    key = f"{prefix}.{name}" if prefix else name
                    if key not in self.tensors:
                        continue
                    saved, current = self.tensors[key], sub._buffers[name]
                    if saved is None or current is None or current.shape != saved.shape:
                        sub._buffers[name] = None if saved is None else saved.clone()
                    else:
                        current.copy_(saved)
