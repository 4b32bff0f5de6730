"""The private gradient scaler used under precision="16-mixed" (GPU only in Lightning; exercised here on CPU by
handing the callback a CPU GradScaler)."""

import functools

import pytest
import torch
from ttt_models import ConvNet, images, loader, trainer

import ttc_lightning as ttc
from ttc_lightning.ttt import base

SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)


def run(model, scale=None, monkeypatch=None):
    if scale is not None:
        monkeypatch.setattr(base, "grad_scaler", lambda _, params: torch.amp.GradScaler("cpu", init_scale=scale))
    callback = ttc.Tent(optimizer=SGD, persistence=ttc.Persistence(keep_adapted=True))
    predictions = torch.cat(trainer([callback]).predict(model, loader(images())))
    return predictions, callback


def test_no_scaler_outside_16_mixed():
    model = ConvNet()
    assert base.grad_scaler("32-true", list(model.parameters())) is None
    assert base.grad_scaler("bf16-mixed", list(model.parameters())) is None


def test_scaled_updates_equal_unscaled_ones(monkeypatch):
    plain, _ = run(reference := ConvNet())
    scaled, callback = run(model := ConvNet(), scale=2.0**12, monkeypatch=monkeypatch)
    torch.testing.assert_close(scaled, plain)
    assert callback.updates == 3 and callback.skipped == 0
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_an_overflowing_scale_skips_the_update_and_backs_off(monkeypatch):
    model = ConvNet(scale=1e4)  # large logits: scaled gradients overflow float32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="non-finite gradients"):
        _, callback = run(model, scale=2.0**127, monkeypatch=monkeypatch)  # gradients overflow float32
    assert callback.skipped >= 1
    assert callback.updater.scaler.get_scale() < 2.0**127  # backed off after the overflow
    assert callback.updates + callback.skipped == 3
    if callback.updates == 0:
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
