"""Tiny models and helpers shared by the tests of the adaptation presets (EATA, SAR, MEMO, CoTTA).

``ConvNet``: conv 3->8, a normalisation layer (BatchNorm2d with non-trivial running statistics, GroupNorm or
LayerNorm), ReLU, pooling and a linear head, with the mixin; it can raise in its forward on a chosen call of a chosen
batch. ``LogitNet``: a linear layer initialised to the identity, so that at the source parameters the output is the
input: per-sample entropies are whatever the test writes down. Plus quiet Trainers, a per-batch recorder of the
callback's figures, and the bitwise restoration check.
"""

import copy

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ttc_lightning as ttc

BN = nn.modules.batchnorm._BatchNorm


class Boom(RuntimeError):
    """The error a model raises on purpose."""


def conv_net(
    classes: int = 4, norm: str = "batch", scale: float = 1.0, seed: int = 0, conv_bias: bool = True
) -> nn.Sequential:
    """conv 3->8, norm, ReLU, pool, flatten, (LayerNorm(8) for ``norm="layer"``), linear 8->classes (weights x
    ``scale``). A conv bias before BatchNorm has an analytically zero gradient, which Adam turns into steps driven
    by float noise: ``conv_bias=False`` for Adam parity on all parameters."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, bias=conv_bias)]
        if norm == "batch":
            layers.append(nn.BatchNorm2d(8))
        elif norm == "group":
            layers.append(nn.GroupNorm(2, 8))
        layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if norm == "layer":
            layers.append(nn.LayerNorm(8))
        layers.append(nn.Linear(8, classes))
        net = nn.Sequential(*layers)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d | nn.GroupNorm | nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-1, 1)
                    m.running_var.uniform_(0.5, 2)
                    m.num_batches_tracked.fill_(7)
            net[-1].weight.mul_(scale)
    return net


class Failing:
    """Forward-call counting, and a forward that raises :class:`Boom` on call ``fail_call`` (1-based, counted within
    the batch) of batch ``fail_batch``."""

    fail_batch: int | None = None
    fail_call: int = 1

    def _count(self) -> None:
        self.calls += 1
        self.batch_calls += 1
        if self.fail_batch is not None and self.batch == self.fail_batch and self.batch_calls == self.fail_call:
            raise Boom(f"forward call {self.batch_calls} of batch {self.batch}")

    def predict_step(self, batch, batch_idx: int = 0, dataloader_idx: int = 0):
        self.batch, self.batch_calls = batch_idx, 0
        return super().predict_step(batch, batch_idx, dataloader_idx)


class ConvNet(Failing, ttc.TestTimeComputeMixin, L.LightningModule):
    def __init__(
        self, classes: int = 4, norm: str = "batch", scale: float = 1.0, seed: int = 0, conv_bias: bool = True
    ) -> None:
        super().__init__()
        self.net = conv_net(classes, norm, scale, seed, conv_bias)
        self.calls = self.batch_calls = self.batch = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._count()
        return self.net(x)


class LogitNet(Failing, ttc.TestTimeComputeMixin, L.LightningModule):
    """``head(x)`` with ``head`` the identity at the source: the input rows are the logits."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.head = nn.Linear(classes, classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(classes))
            self.head.bias.zero_()
        self.calls = self.batch_calls = self.batch = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._count()
        return self.head(x)


def images(n: int = 24, seed: int = 3, size: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def loader(x: torch.Tensor, batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(x), batch_size=batch_size)


def trainer(callbacks=(), **kwargs) -> L.Trainer:
    """A quiet CPU Trainer with the defaults otherwise (``inference_mode=True``)."""
    options = dict(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        devices=1,
    )
    return L.Trainer(callbacks=list(callbacks), **{**options, **kwargs})


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-(softmax * log_softmax).sum(1)``, written out."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def batch_stats(net: nn.Module) -> nn.Module:
    """A copy of ``net`` configured as tent.py does: BatchNorm2d in train mode without running statistics (batch
    statistics), everything else in eval mode."""
    net = copy.deepcopy(net)
    net.eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return net


class Recorder(L.Callback):
    """After every batch: the callback's figures and a copy of the given parameters (by name)."""

    FIGURES = ("updates", "backwards", "resets", "skipped", "kept_fraction", "last_loss")

    def __init__(self, callback, names: list[str] | None = None) -> None:
        self.callback, self.names = callback, names
        self.figures: list[dict] = []
        self.params: list[list[torch.Tensor]] = []

    def on_predict_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        self.figures.append({k: getattr(self.callback, k) for k in self.FIGURES})
        named = dict(pl_module.named_parameters())
        names = self.names if self.names is not None else list(named)
        self.params.append([named[n].detach().clone() for n in names])

    def column(self, name: str) -> list:
        return [f[name] for f in self.figures]


def state(model: nn.Module) -> dict:
    """Everything restoration promises: tensor bits, gradients, modes, flags, BatchNorm attributes, hooks, no
    instance ``forward`` anywhere."""
    return {
        "tensors": {
            k: (v.dtype, tuple(v.shape), v.detach().clone().reshape(-1).view(torch.uint8))
            for k, v in model.state_dict(keep_vars=True).items()
        },
        "none_buffers": sorted(
            f"{p}.{n}" for p, m in model.named_modules() for n, b in m._buffers.items() if b is None
        ),
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "attrs": {n: (m.track_running_stats, m.momentum) for n, m in model.named_modules() if isinstance(m, BN)},
        "hooks": {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()},
        "own_forward": {n: "forward" in vars(m) for n, m in model.named_modules()},
    }


def assert_state(model: nn.Module, before: dict) -> None:
    after = state(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (dtype, shape, bits) in before["tensors"].items():
        got_dtype, got_shape, got_bits = after["tensors"][name]
        assert got_dtype == dtype and got_shape == shape and torch.equal(got_bits, bits), name
    for name, grad in before["grads"].items():
        got = after["grads"][name]
        assert (got is None and grad is None) or (got is not None and grad is not None and torch.equal(got, grad)), name
    for key in ("none_buffers", "modes", "flags", "attrs", "hooks", "own_forward"):
        assert after[key] == before[key], key


def odd_state(model: nn.Module) -> nn.Module:
    """Non-default modes and flags, so that restoring them is visible. (No stored gradient: Lightning's predict
    clears gradients even without callbacks.)"""
    model.train()
    list(model.modules())[-1].eval()
    next(iter(model.parameters())).requires_grad_(False)
    return model


def check_restored_after_predict(model: nn.Module, callback, x: torch.Tensor, batch_size: int = 8) -> list:
    """``trainer.predict`` with a default-settings Trainer; the model comes back bitwise; returns the predictions."""
    model = odd_state(model)
    before = state(model)
    t = trainer([callback])
    preds = t.predict(model, loader(x, batch_size))
    assert callback.updates > 0  # something was adapted, so the restoration is not vacuous
    assert_state(model, before)
    assert t.predict_loop.inference_mode is True
    return preds


def check_restored_on_exception(model: nn.Module, callback, x: torch.Tensor, fail_call: int = 1) -> None:
    """The forward raises on call ``fail_call`` of the second batch, after the first batch adapted the model."""
    model = odd_state(model)
    model.fail_batch, model.fail_call = 1, fail_call
    before = state(model)
    t = trainer([callback])
    try:
        t.predict(model, loader(x))
    except Boom:
        pass
    else:
        raise AssertionError("the forward's exception did not reach the caller")
    assert model.batch == 1 and model.batch_calls == fail_call  # it failed where intended
    assert callback.updates >= 1  # the first batch adapted the model
    assert_state(model, before)
    assert t.predict_loop.inference_mode is True
