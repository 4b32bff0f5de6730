"""Snapshot and bitwise restore of a module: parameters, gradients, buffers, modes, flags, ``requires_grad``."""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: Submodule attributes recorded and restored: the mode and the normalisation flags strategies may touch. Other
#: attributes (a user's counters, caches) are the module's own business and are left as they are.
ATTRIBUTES = ("training", "track_running_stats", "momentum")


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass
class ModuleSnapshot:
    """What a module looked like at one moment.

    ``tensors`` holds clones of every parameter, gradient and buffer (``None`` when not captured: cheap, and enough
    for strategies that never change the model). Buffers that are ``None`` (e.g. dropped running statistics) are
    recorded as such and restored as such.
    """

    attributes: dict[str, dict[str, object]]
    requires_grad: dict[str, bool]
    tensors: dict[str, Tensor | None] | None
    grads: dict[str, Tensor | None] | None

    @classmethod
    def capture(cls, module: nn.Module, tensors: bool = True) -> "ModuleSnapshot":
        """Record ``module``; clone its parameters, gradients and buffers only when ``tensors`` is true."""
        snapshot = cls(
            attributes={
                prefix: {name: vars(sub)[name] for name in ATTRIBUTES if name in vars(sub)}
                for prefix, sub in module.named_modules(remove_duplicate=False)
            },
            requires_grad={name: p.requires_grad for name, p in module.named_parameters(remove_duplicate=False)},
            tensors=None,
            grads=None,
        )
        return snapshot.with_tensors(module) if tensors else snapshot

    def with_tensors(self, module: nn.Module) -> "ModuleSnapshot":
        """This snapshot's attributes and flags with clones of ``module``'s parameters, gradients and buffers as they
        are now (e.g. modes recorded before a Trainer stage, tensors after it loaded a checkpoint)."""
        params = dict(module.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            saved = {name: p.detach().clone() for name, p in params.items()}
            grads = {name: None if p.grad is None else p.grad.detach().clone() for name, p in params.items()}
            for prefix, sub in module.named_modules(remove_duplicate=False):
                for name, buffer in sub._buffers.items():
                    saved[_key(prefix, name)] = None if buffer is None else buffer.detach().clone()
        return ModuleSnapshot(self.attributes, self.requires_grad, saved, grads)

    def values(self) -> "ModuleSnapshot":
        """The captured tensors alone (no copy of a tensor; a dict of their own): restoring the result puts back
        parameters, gradients and buffers and leaves modes, flags and ``requires_grad`` as they are."""
        if self.tensors is None or self.grads is None:
            raise ValueError("This snapshot holds no tensors (captured with tensors=False).")
        return ModuleSnapshot(attributes={}, requires_grad={}, tensors=dict(self.tensors), grads=dict(self.grads))

    def restore(self, module: nn.Module, tensors: bool = True) -> None:
        """Put ``module`` back exactly as captured (values bitwise, attributes, ``requires_grad``); with ``tensors``
        false (default true), only the attributes and ``requires_grad``."""
        for prefix, sub in module.named_modules(remove_duplicate=False):
            for name, value in self.attributes.get(prefix, {}).items():
                object.__setattr__(sub, name, value)
        params = dict(module.named_parameters(remove_duplicate=False))
        for name, flag in self.requires_grad.items():
            params[name].requires_grad_(flag)
        if not tensors or self.tensors is None or self.grads is None:
            return
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(self.tensors[name])
                grad = self.grads.get(name)
                p.grad = None if grad is None else grad.clone()
            for prefix, sub in module.named_modules(remove_duplicate=False):
                for name in list(sub._buffers):
                    key = _key(prefix, name)
                    if key not in self.tensors:
                        continue
                    saved, current = self.tensors[key], sub._buffers[name]
                    if saved is None or current is None or current.shape != saved.shape:
                        sub._buffers[name] = None if saved is None else saved.clone()
                    else:
                        current.copy_(saved)
