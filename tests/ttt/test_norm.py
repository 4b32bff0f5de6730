"""BatchNormAdapt and the normalisation-statistics policies (batch, mix, ema, source) against formulas written out."""

import copy
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ttc_lightning as ttc
from ttc_lightning.ttt.norm import NormStatistics

BN = nn.modules.batchnorm._BatchNorm


def randomize_norms(net: nn.Module) -> nn.Module:
    """Source statistics and affine parameters far from the defaults, so that every policy gives other numbers."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, BN):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.num_batches_tracked.fill_(11)
    return net


class Net(ttc.TestTimeComputeMixin, L.LightningModule):
    """conv 3->8, BatchNorm2d, ReLU, Dropout(0.9), pool, linear, BatchNorm1d, ReLU, linear; records forward facts."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = randomize_norms(
            nn.Sequential(
                nn.Conv2d(3, 8, 3),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.Dropout(0.9),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(8, 6),
                nn.BatchNorm1d(6),
                nn.ReLU(),
                nn.Linear(6, 4),
            )
        )
        self.calls = 0
        self.inference = []

    def forward(self, x):
        self.calls += 1
        self.inference.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return self.net(x)


class Vector(ttc.TestTimeComputeMixin, L.LightningModule):
    """Linear, BatchNorm1d, ReLU, linear on (N, 5) inputs: a batch of one has a single value per channel."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = randomize_norms(nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)))

    def forward(self, x):
        return self.net(x)


def images(n: int = 20) -> torch.Tensor:
    return torch.randn(n, 3, 7, 7, generator=torch.Generator().manual_seed(3)) * 1.5 + 0.7


def loader(x: torch.Tensor, batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(x), batch_size=batch_size)


def batch_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over every dimension but the channel one."""
    dims = [0, *range(2, h.ndim)]
    mean = h.mean(dims)
    return mean, ((h - mean.view(1, -1, *[1] * (h.ndim - 2))) ** 2).mean(dims)


def reference_forward(net: nn.Sequential, x: torch.Tensor, stats) -> torch.Tensor:
    """The sequential model layer by layer, BatchNorm written out with ``stats(layer, h) -> (mean, var)``, dropout
    skipped (eval mode)."""
    h = x
    with torch.no_grad():
        for layer in net:
            if isinstance(layer, BN):
                mean, var = stats(layer, h)
                shape = (1, -1, *[1] * (h.ndim - 2))
                h = (h - mean.view(shape)) / torch.sqrt(var.view(shape) + layer.eps)
                h = h * layer.weight.view(shape) + layer.bias.view(shape)
            elif not isinstance(layer, nn.Dropout):
                h = layer(h)
    return h


def source_stats(layer, h):
    return layer.running_mean, layer.running_var


def predict(model, callbacks, data, make_trainer, **kwargs):
    trainer = make_trainer(callbacks, **kwargs)
    return torch.cat(trainer.predict(model, data)), trainer


def state(model) -> dict:
    """Tensors (cloned), modes, flags and forward pre-hooks: what must come back after a run."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": {n: len(m._forward_pre_hooks) for n, m in model.named_modules()},
        "own_forward": {n: "forward" in vars(m) for n, m in model.named_modules()},
        "attrs": {n: (m.track_running_stats, m.momentum) for n, m in model.named_modules() if isinstance(m, BN)},
    }


def assert_state(model, before) -> None:
    after = state(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, value in before["tensors"].items():
        got = after["tensors"][name]
        assert got.dtype == value.dtype and torch.equal(
            got.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)
        ), name
    for key in ("modes", "flags", "hooks", "own_forward", "attrs"):
        assert after[key] == before[key], key
    assert "forward" not in model.__dict__


# batch --------------------------------------------------------------------------------------------------------------


def test_batch_statistics_equal_train_mode_batchnorm_with_dropout_in_eval(make_trainer):
    model, x = Net(), images(20)  # batches of 8, 8 and a short last one of 4
    before = state(model)
    out, _ = predict(model, [ttc.BatchNormAdapt()], loader(x), make_trainer)
    torch_ref = copy.deepcopy(model.net).train()
    torch_ref[3].eval()  # dropout p=0.9 in eval mode: outputs are deterministic
    with torch.no_grad():
        expected = torch.cat([torch_ref(b) for b in x.split(8)])
    written = torch.cat([reference_forward(model.net, b, lambda layer, h: batch_stats(h)) for b in x.split(8)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, written, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, reference_forward(model.net, x, source_stats), atol=1e-3)  # a real change
    assert_state(model, before)


def test_dropout_stays_in_eval_two_runs_identical(make_trainer):
    model, x = Net(), images(16)
    first, _ = predict(model, [ttc.BatchNormAdapt()], loader(x), make_trainer)
    second, _ = predict(model, [ttc.BatchNormAdapt()], loader(x), make_trainer)
    assert torch.equal(first, second)


def test_no_gradients_and_inference_mode_untouched(make_trainer):
    model, x = Net(), images(16)
    seen = []

    class Probe(L.Callback):
        def on_predict_batch_start(self, trainer, *args, **kwargs):
            seen.append(trainer.predict_loop.inference_mode)

    out, trainer = predict(model, [ttc.BatchNormAdapt(), Probe()], loader(x), make_trainer)
    assert seen == [True, True]
    assert model.inference == [(True, False), (True, False)]  # one forward per batch, no autograd
    assert trainer.predict_loop.inference_mode is True
    assert all(p.grad is None for p in model.parameters())
    assert not out.requires_grad


# mix ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_mix_equals_the_formula(alpha, make_trainer):
    model, x = Net(), images(20)
    before = state(model)
    out, _ = predict(model, [ttc.BatchNormAdapt(norm="mix", alpha=alpha)], loader(x), make_trainer)

    def mixed(layer, h):
        mean, var = batch_stats(h)
        return alpha * layer.running_mean + (1 - alpha) * mean, alpha * layer.running_var + (1 - alpha) * var

    expected = torch.cat([reference_forward(model.net, b, mixed) for b in x.split(8)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert_state(model, before)


# ema ----------------------------------------------------------------------------------------------------------------


def ema_reference(net, batches, momentum):
    """EMA statistics step by step: per batch and layer, update with the batch statistics, then normalise with them.
    Returns the outputs and the statistics of every layer after every batch."""
    running = {layer: (layer.running_mean.clone(), layer.running_var.clone()) for layer in net if isinstance(layer, BN)}
    outputs, history = [], []

    def stats(layer, h):
        mean, var = batch_stats(h)
        old_mean, old_var = running[layer]
        running[layer] = ((1 - momentum) * old_mean + momentum * mean, (1 - momentum) * old_var + momentum * var)
        return running[layer]

    for b in batches:
        outputs.append(reference_forward(net, b, stats))
        history.append([tuple(t.clone() for t in running[layer]) for layer in running])
    return outputs, history


class StatsProbe(L.Callback):
    """Records the running statistics of every BatchNorm layer after each batch."""

    def __init__(self) -> None:
        self.history = []

    def on_predict_batch_end(self, trainer, pl_module, *args, **kwargs):
        layers = [m for m in pl_module.modules() if isinstance(m, BN)]
        self.history.append([(m.running_mean.detach().clone(), m.running_var.detach().clone()) for m in layers])


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0])
def test_ema_carries_over_between_batches_and_equals_the_formula(momentum, make_trainer):
    model, x = Net(), images(20)
    before = state(model)
    probe = StatsProbe()
    out, _ = predict(model, [ttc.BatchNormAdapt(norm="ema", momentum=momentum), probe], loader(x), make_trainer)
    outputs, history = ema_reference(model.net, x.split(8), momentum)
    torch.testing.assert_close(out, torch.cat(outputs), rtol=1e-5, atol=1e-5)
    assert len(probe.history) == len(history) == 3
    for got, want in zip(probe.history, history, strict=True):
        for (gm, gv), (wm, wv) in zip(got, want, strict=True):
            torch.testing.assert_close(gm, wm, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(gv, wv, rtol=1e-5, atol=1e-6)
    if momentum < 1:  # carried over: the third batch's statistics are not the third batch's own
        assert not torch.allclose(probe.history[2][0][0], batch_stats(model.net[0](x[16:]))[0], atol=1e-3)
    assert_state(model, before)  # restored after the run


def test_ema_keep_adapted_keeps_the_final_statistics(make_trainer):
    model, x = Net(), images(20)
    source = copy.deepcopy(model.net)
    predict(
        model,
        [ttc.BatchNormAdapt(norm="ema", momentum=0.3, persistence=ttc.Persistence(keep_adapted=True))],
        loader(x),
        make_trainer,
    )
    _, history = ema_reference(source, x.split(8), 0.3)
    layers = [m for m in model.net if isinstance(m, BN)]
    for layer, (mean, var) in zip(layers, history[-1], strict=True):
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-5, atol=1e-6)
        assert layer.running_mean.grad_fn is None and not layer.running_mean.requires_grad
    for name, p in model.named_parameters():  # statistics only: parameters untouched
        assert torch.equal(p, dict(source.named_parameters())[name.removeprefix("net.")])
    assert all(len(m._forward_pre_hooks) == 0 and "forward" not in vars(m) for m in model.modules())


def test_ema_ignores_a_non_finite_batch(make_trainer):
    model, x = Net(), images(24)
    bad = x.clone()
    bad[9, 0, 2, 2] = float("nan")  # second batch
    probe = StatsProbe()
    out, _ = predict(model, [ttc.BatchNormAdapt(norm="ema", momentum=0.5), probe], loader(bad), make_trainer)
    clean_batches = [x[:8], x[16:]]
    outputs, history = ema_reference(model.net, clean_batches, 0.5)
    torch.testing.assert_close(out[:8], outputs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[16:], outputs[1], rtol=1e-5, atol=1e-5)
    for (gm, gv), (wm, wv) in zip(probe.history[1], history[0], strict=True):  # unchanged by the bad batch
        torch.testing.assert_close(gm, wm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gv, wv, rtol=1e-5, atol=1e-6)


# batch size one, short last batch -----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["batch", "mix", "ema"])
def test_batchnorm1d_batch_of_one_uses_source_statistics(norm, make_trainer):
    """norm.py: a batch with one value per channel has no variance: batch and mix use the source statistics for it,
    ema leaves its running statistics unchanged. Batches of 4, 4 and 1."""
    model = Vector()
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(4)) + 0.5
    before = state(model)
    weights = {"mix": {"alpha": 0.4}, "ema": {"momentum": 0.2}}.get(norm, {})  # each acts with its own policy only
    out, _ = predict(model, [ttc.BatchNormAdapt(norm=norm, **weights)], loader(x, 4), make_trainer)
    assert out.shape == (9, 3)
    if norm == "ema":
        outputs, history = ema_reference(model.net, [x[:4], x[4:8]], 0.2)
        last = reference_forward(model.net, x[8:], lambda layer, h: history[-1][0])
        expected = torch.cat([*outputs, last])
    else:

        def stats(layer, h):
            mean, var = batch_stats(h)
            if norm == "mix":
                return 0.4 * layer.running_mean + 0.6 * mean, 0.4 * layer.running_var + 0.6 * var
            return mean, var

        full = [reference_forward(model.net, b, stats) for b in (x[:4], x[4:8])]
        expected = torch.cat([*full, reference_forward(model.net, x[8:], source_stats)])
        with torch.no_grad():
            eval_out = copy.deepcopy(model.net).eval()(x[8:])
            torch.testing.assert_close(out[8:], eval_out, rtol=1e-5, atol=1e-6)  # the eval-mode output
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()
    assert_state(model, before)


def test_conv_batch_of_one_uses_its_spatial_statistics(make_trainer):
    """BatchNorm2d at batch size 1 still has H*W values per channel: the single image's statistics (train-mode BN)."""
    model, x = Net(), images(9)
    net = model.net
    net[7] = nn.Identity()  # no BatchNorm1d: the head would see one value per channel
    out, _ = predict(model, [ttc.BatchNormAdapt()], loader(x, 4), make_trainer)
    ref = copy.deepcopy(net).train()
    ref[3].eval()
    with torch.no_grad():
        expected = torch.cat([ref(b) for b in x.split(4)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# source, validation, restoration ------------------------------------------------------------------------------------


def test_source_policy_is_the_plain_eval_model(make_trainer):
    """With a zero learning rate nothing moves, so norm="source" must give the plain eval model's outputs. Without an
    optimizer the policy would change nothing at all, which is refused."""
    model, x = Net(), images(16)
    frozen = ttc.TestTimeTraining(optimizer=lambda params: torch.optim.SGD(params, lr=0.0), norm="source")
    out, _ = predict(model, [frozen], loader(x), make_trainer)
    plain, _ = predict(model, [], loader(x), make_trainer)
    assert torch.equal(out, plain)
    with pytest.raises(ValueError, match=r"`norm`='source' has no effect: without an `optimizer`"):
        ttc.BatchNormAdapt(norm="source")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"norm": "sometimes"}, "norm"),
        ({"norm": "Batch"}, "norm"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"momentum": 0.0}, "momentum"),
        ({"momentum": 1.01}, "momentum"),
    ],
)
def test_bad_arguments_are_value_errors_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        ttc.BatchNormAdapt(**kwargs)
    policy = {"norm": "policy"}.get(name, name)
    with pytest.raises(ValueError, match=f"`{name}`"):
        NormStatistics(**{policy: kwargs[name]})


def test_policy_on_a_plain_module_and_its_cleanup():
    """NormStatistics without Lightning: batch statistics while installed; the clean-up removes the hooks and puts
    the source statistics back."""
    net = randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten())).eval()
    source = copy.deepcopy(net)
    x = images(6)
    cleanup = NormStatistics("batch").apply(net)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference_forward(source, x, lambda layer, h: batch_stats(h)))
    cleanup()
    assert len(net[1]._forward_pre_hooks) == 0 and "forward" not in vars(net[1])
    for name, value in source.state_dict().items():
        assert torch.equal(net.state_dict()[name], value), name
    with torch.no_grad():
        assert torch.equal(net(x), source(x))


@pytest.mark.parametrize(
    "kwargs", [{}, {"norm": "mix"}, {"norm": "ema", "persistence": ttc.Persistence(keep_adapted=True)}]
)
def test_after_the_run_the_model_trains_normally(kwargs, make_trainer):
    """The statistics left in the model after a run under the default ``inference_mode=True`` must be ordinary
    tensors: a later training step (BatchNorm updates its running statistics in place, autograd saves them) works."""
    model, x = Net(), images(16)
    predict(model, [ttc.BatchNormAdapt(**kwargs)], loader(x), make_trainer)
    for m in model.modules():
        if isinstance(m, BN):
            assert not m.running_mean.is_inference() and not m.running_var.is_inference()
    model.train()
    model(x).sum().backward()  # raises on inference tensors
    assert model.net[0].weight.grad is not None


def test_batchnorm_adapt_on_a_model_without_batchnorm_is_not_silent(make_trainer):
    """A model without BatchNorm statistics gets nothing from BatchNormAdapt: say so (error or warning) instead of
    returning the source predictions as if adapted (issue 3, item 7: no adaptable parameters -> clear)."""
    model = Net()
    model.net[1] = nn.GroupNorm(2, 8)
    model.net[7] = nn.LayerNorm(6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            predict(model, [ttc.BatchNormAdapt()], loader(images(8)), make_trainer)
        except ValueError as error:
            assert "BatchNorm" in str(error)
            return
    assert any("BatchNorm" in str(w.message) for w in caught), [str(w.message) for w in caught]
