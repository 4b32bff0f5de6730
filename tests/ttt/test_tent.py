"""Tent against the authors' tent.py written out in the test; restoration, keep_adapted, composition, stages."""

import copy
import functools

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ttc_lightning as ttc

BN = nn.modules.batchnorm._BatchNorm
SGD = functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9)
ADAM = functools.partial(torch.optim.Adam, lr=0.02)


class Net(ttc.TestTimeComputeMixin, L.LightningModule):
    """conv 3->8, BatchNorm2d, ReLU, Dropout, pool, linear 8->4; counts forward calls; its test step records
    ``self(x)``."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        )
        with torch.no_grad():
            bn = self.net[1]
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.num_batches_tracked.fill_(5)
        self.calls = 0
        self.tested: list[torch.Tensor] = []

    def forward(self, x):
        self.calls += 1
        return self.net(x)

    def test_step(self, batch, batch_idx):
        out = self(batch[0])
        self.tested.append(out.detach().clone())
        self.log("entropy", -(out.softmax(1) * out.log_softmax(1)).sum(1).mean())


def images(n: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def loader(x: torch.Tensor, batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(x), batch_size=batch_size)


def tent_reference(net: nn.Module, batches, optimizer, steps: int = 1, episodic: bool = False):
    """The authors' tent.py (configure_model, collect_params, forward_and_adapt, reset), except that dropout stays in
    eval mode (tent.py's model.train() enables it; documented difference). Returns per-batch outputs, the adapted
    parameters after every batch, the last loss and the configured model."""
    net = copy.deepcopy(net)
    net.train()
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    net.requires_grad_(False)
    params = []
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            params += [m.weight, m.bias]
    opt = optimizer(params)
    model_state, opt_state = copy.deepcopy(net.state_dict()), copy.deepcopy(opt.state_dict())
    outputs, history, loss = [], [], None
    for x in batches:
        if episodic:
            net.load_state_dict(model_state, strict=True)
            opt.load_state_dict(opt_state)
        for _ in range(steps):
            out = net(x)
            loss = -(out.softmax(1) * out.log_softmax(1)).sum(1).mean(0)
            loss.backward()
            opt.step()
            opt.zero_grad()
        outputs.append(out.detach())
        history.append([p.detach().clone() for p in params])
    return outputs, history, loss.item(), net


class ParamProbe(L.Callback):
    """The affine parameters of every BatchNorm layer after each batch, and the loop's inference-mode flag."""

    def __init__(self) -> None:
        self.history, self.inference_mode = [], []

    def on_predict_batch_end(self, trainer, pl_module, *args, **kwargs):
        layers = [m for m in pl_module.modules() if isinstance(m, BN)]
        self.history.append([p.detach().clone() for m in layers for p in (m.weight, m.bias)])
        self.inference_mode.append(trainer.predict_loop.inference_mode)


def state(model) -> dict:
    """Everything restoration promises: tensors, gradients, modes, flags, BatchNorm attributes, hooks."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "attrs": {n: (m.track_running_stats, m.momentum) for n, m in model.named_modules() if isinstance(m, BN)},
        "hooks": {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in model.named_modules()},
        "own_forward": {n: "forward" in vars(m) for n, m in model.named_modules()},
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


def assert_state(model, before: dict, skip: tuple[str, ...] = ()) -> None:
    after = state(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, value in before["tensors"].items():
        if name in skip:
            continue
        got = after["tensors"][name]
        assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(bits(got), bits(value)), name
    for name, grad in before["grads"].items():
        got = after["grads"][name]
        assert (got is None and grad is None) or torch.equal(got, grad), name
    for key in ("modes", "flags", "attrs", "hooks", "own_forward"):
        assert after[key] == before[key], key
    assert "forward" not in model.__dict__


def odd_state(model: Net) -> Net:
    """A model whose modes and flags are not the defaults, so that restoring them is visible."""
    model.train()
    model.net[1].eval()
    model.net[0].bias.requires_grad_(False)
    model.net[1].weight.requires_grad_(False)  # Tent adapts it anyway; the flag must come back
    return model


# Parity -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("episodic", [False, True], ids=["online", "episodic"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("optimizer", [SGD, ADAM], ids=["sgd_momentum", "adam"])
def test_parity_with_tent_written_out(optimizer, steps, episodic, make_trainer):
    model, x = odd_state(Net()), images()
    before = state(model)
    probe = ParamProbe()
    tent = ttc.Tent(optimizer=optimizer, steps=steps, episodic=episodic)
    trainer = make_trainer([tent, probe])  # default inference_mode=True
    if episodic and steps == 1:  # every prediction would be the source model's, before its batch's only update
        with pytest.raises(ValueError, match=r"`episodic`=True.* with steps=1 leaves the `optimizer` without effect"):
            trainer.predict(model, loader(x))
        assert_state(model, before)
        return
    preds = trainer.predict(model, loader(x))
    outputs, history, last_loss, _ = tent_reference(model.net, x.split(8), optimizer, steps, episodic)

    assert len(preds) == 3
    for pred, expected in zip(preds, outputs, strict=True):
        assert pred.shape == expected.shape and pred.dtype == expected.dtype and not pred.requires_grad
        torch.testing.assert_close(pred, expected, rtol=0, atol=1e-6)
    for got, want in zip(probe.history, history, strict=True):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    assert not torch.allclose(probe.history[-1][0], model.net[1].weight)  # the parameters really moved
    assert tent.updates == 3 * steps and tent.resets == (2 if episodic else 0) and tent.skipped == 0
    assert tent.last_loss == pytest.approx(last_loss, rel=1e-6)
    assert probe.inference_mode == [False] * 3
    assert trainer.predict_loop.inference_mode is True
    assert_state(model, before)


def test_default_tent_is_adam_lr_1e_3(make_trainer):
    model, x = Net(), images(16)
    preds = torch.cat(make_trainer([ttc.Tent()]).predict(model, loader(x)))
    outputs, *_ = tent_reference(model.net, x.split(8), functools.partial(torch.optim.Adam, lr=1e-3))
    torch.testing.assert_close(preds, torch.cat(outputs), rtol=0, atol=1e-6)


def test_batchnorm1d_parity_and_a_batch_of_one(make_trainer):
    """The whole BatchNorm family adapts: a BatchNorm1d head matches train-mode TENT on full batches; the last batch of
    one uses the source statistics (norm.py) and still updates the affine parameters."""

    class Vector(ttc.TestTimeComputeMixin, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
            with torch.no_grad():
                self.net[1].running_mean.uniform_(-1, 1)
                self.net[1].running_var.uniform_(0.5, 2)

        def forward(self, x):
            return self.net(x)

    model = Vector()
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(5))
    before = state(model)
    probe = ParamProbe()
    preds = make_trainer([ttc.Tent(optimizer=SGD), probe]).predict(model, loader(x, 4))

    # written out: the BatchNorm1d layer functionally, batch statistics for batches > 1, source ones for a batch of 1
    lin1, bn, lin2 = (copy.deepcopy(model.net[i]) for i in (0, 1, 3))
    weight, bias = (nn.Parameter(p.detach().clone()) for p in (bn.weight, bn.bias))
    opt = SGD([weight, bias])
    for i, b in enumerate(x.split(4)):
        with torch.no_grad():
            h = lin1(b)
        if len(b) > 1:
            mean, var = h.mean(0), h.var(0, unbiased=False)
        else:
            mean, var = bn.running_mean, bn.running_var
        out = lin2(torch.relu((h - mean) / torch.sqrt(var + bn.eps) * weight + bias))
        loss = -(out.softmax(1) * out.log_softmax(1)).sum(1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(preds[i], out.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(probe.history[i][0], weight.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(probe.history[i][1], bias.detach(), rtol=0, atol=1e-6)
    assert_state(model, before)


def test_dropout_stays_in_eval_mode(make_trainer):
    """tent.py's model.train() would enable dropout p=0.9; here it stays off: deterministic, equal to the reference."""
    model, x = Net(dropout=0.9), images(16)
    runs = [torch.cat(make_trainer([ttc.Tent(optimizer=SGD)]).predict(model, loader(x))) for _ in range(2)]
    outputs, *_ = tent_reference(model.net, x.split(8), SGD)
    assert torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs[0], torch.cat(outputs), rtol=0, atol=1e-6)


def test_two_predict_runs_give_identical_results_and_figures(make_trainer):
    model, x = Net(), images()
    tent = ttc.Tent(optimizer=ADAM, steps=2)
    runs, figures = [], []
    for _ in range(2):
        runs.append(torch.cat(make_trainer([tent]).predict(model, loader(x))))
        figures.append((tent.updates, tent.resets, tent.skipped, tent.last_loss))
    assert torch.equal(runs[0], runs[1])
    assert figures[0] == figures[1] and figures[0][0] == 6


def test_inputs_created_in_inference_mode_are_adapted_on(make_trainer):
    """A dataset whose tensors are inference tensors: the callback clones them before autograd sees them (adapting
    the first convolution needs its input saved for backward)."""
    with torch.inference_mode():
        frozen = list(images(16).split(8))  # batches as they are, no collation (which would make new tensors)
    assert next(iter(DataLoader(frozen, batch_size=None))).is_inference()
    runs = []
    for batches in (frozen, list(images(16).split(8))):
        tent = ttc.Tent(optimizer=SGD, params="all")
        runs.append(torch.cat(make_trainer([tent]).predict(Net(), DataLoader(batches, batch_size=None))))
        assert tent.updates == 2 and tent.skipped == 0
    assert torch.equal(runs[0], runs[1])


# keep_adapted -------------------------------------------------------------------------------------------------------


def test_keep_adapted_keeps_parameters_and_returns_source_statistics(make_trainer):
    model, x = odd_state(Net()), images()
    before, source = state(model), copy.deepcopy(model.net)
    tent = ttc.Tent(optimizer=SGD, steps=2, persistence=ttc.Persistence(keep_adapted=True))
    trainer = make_trainer([tent])
    trainer.predict(model, loader(x))
    _, history, _, _ = tent_reference(source, x.split(8), SGD, steps=2)
    bn = model.net[1]
    torch.testing.assert_close(bn.weight.detach(), history[-1][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(bn.bias.detach(), history[-1][1], rtol=0, atol=1e-6)
    # norm.py: "batch" puts the source statistics back; they are plain tensors again
    assert bn.running_mean.grad_fn is None and not bn.running_mean.requires_grad
    assert bn.running_var.grad_fn is None and not bn.running_var.requires_grad
    assert trainer.predict_loop.inference_mode is True
    assert_state(model, before, skip=("net.1.weight", "net.1.bias"))  # stats, counter, flags, modes: as before
    assert not torch.equal(bn.weight, before["tensors"]["net.1.weight"])


def test_keep_adapted_twice_continues_the_adaptation(make_trainer):
    """Continual adaptation across predict calls: two kept runs equal one run over both halves (plain SGD has no
    optimizer state to lose between the runs)."""
    model, x = Net(), images(32)
    sgd = functools.partial(torch.optim.SGD, lr=0.5)
    first = make_trainer([ttc.Tent(optimizer=sgd, persistence=ttc.Persistence(keep_adapted=True))]).predict(
        model, loader(x[:16])
    )
    second = make_trainer([ttc.Tent(optimizer=sgd, persistence=ttc.Persistence(keep_adapted=True))]).predict(
        model, loader(x[16:])
    )
    outputs, history, _, _ = tent_reference(Net().net, x.split(8), sgd)
    torch.testing.assert_close(torch.cat(first + second), torch.cat(outputs), rtol=0, atol=1e-6)
    torch.testing.assert_close(model.net[1].weight.detach(), history[-1][0], rtol=0, atol=1e-6)


# Restoration on interruption ----------------------------------------------------------------------------------------


class Interrupt(L.Callback):
    def __init__(self, error: BaseException, at: int = 1) -> None:
        self.error, self.at = error, at

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.at:
            raise self.error


@pytest.mark.parametrize(
    ("error", "raised"),
    [(RuntimeError("boom"), RuntimeError), (KeyboardInterrupt(), SystemExit)],
    ids=["error", "ctrl-c"],
)
def test_restored_after_an_exception_mid_run(error, raised, make_trainer):
    model, x = odd_state(Net()), images()
    before = state(model)
    trainer = make_trainer([ttc.Tent(optimizer=SGD), Interrupt(error)])
    with pytest.raises(raised):
        trainer.predict(model, loader(x))
    assert model.calls == 2
    assert_state(model, before)
    assert trainer.predict_loop.inference_mode is True


# Composition with test-time augmentation ----------------------------------------------------------------------------


@pytest.mark.parametrize("tta_first", [False, True], ids=["tent_first", "tta_first"])
@pytest.mark.parametrize("chunk_size", [1, None], ids=["views_apart", "views_stacked"])
def test_with_tta_the_loss_uses_the_identity_view_and_the_prediction_merges_views(chunk_size, tta_first, make_trainer):
    """DESIGN 2: the loss stays on the model's own forward; the prediction is the hflip-mean forward of the adapted
    model (one extra forward per view chunk). With batch statistics, views forwarded apart normalise with their own
    statistics, stacked views with their joint ones."""
    model, x = Net(), images()
    tent = ttc.Tent(optimizer=SGD, steps=2)
    tta = ttc.TestTimeAugmentation(transforms="hflip", merge="mean", chunk_size=chunk_size)
    preds = make_trainer([tta, tent] if tta_first else [tent, tta]).predict(model, loader(x))

    net = copy.deepcopy(model.net).train()
    net.requires_grad_(False)
    bn = net[1]
    bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    bn.requires_grad_(True)
    opt = SGD([bn.weight, bn.bias])
    for pred, b in zip(preds, x.split(8), strict=True):
        for _ in range(2):
            out = net(b)
            loss = -(out.softmax(1) * out.log_softmax(1)).sum(1).mean(0)
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            if chunk_size == 1:
                expected = (net(b) + net(b.flip(-1))) / 2
            else:
                both = net(torch.cat([b, b.flip(-1)]))
                expected = (both[: len(b)] + both[len(b) :]) / 2
        torch.testing.assert_close(pred, expected, rtol=0, atol=1e-6)
    assert tent.last_loss == pytest.approx(loss.item(), rel=1e-6)
    assert model.calls == 3 * (2 + (2 if chunk_size == 1 else 1))


def test_two_adaptation_callbacks_fail_at_setup(make_trainer):
    model, x = Net(), images(8)
    before = state(model)
    trainer = make_trainer([ttc.Tent(), ttc.BatchNormAdapt()])
    with pytest.raises(ValueError, match=r"Two test-time strategies of role 'adaptation'.*Tent.*BatchNormAdapt"):
        trainer.predict(model, loader(x))
    assert model.calls == 0
    assert trainer.predict_loop.inference_mode is True
    assert_state(model, before)


# trainer.test -------------------------------------------------------------------------------------------------------


def test_usable_in_trainer_test(make_trainer):
    model, x = odd_state(Net()), images()
    before = state(model)
    flags = []

    class Probe(L.Callback):
        def on_test_batch_start(self, trainer, *args, **kwargs):
            flags.append(trainer.test_loop.inference_mode)

    tent = ttc.Tent(optimizer=ADAM, steps=2, stages=("test",))
    trainer = make_trainer([tent, Probe()])
    metrics = trainer.test(model, loader(x), verbose=False)
    outputs, _, last_loss, _ = tent_reference(model.net, x.split(8), ADAM, steps=2)
    torch.testing.assert_close(torch.cat(model.tested), torch.cat(outputs), rtol=0, atol=1e-6)
    assert flags == [False] * 3 and trainer.test_loop.inference_mode is True
    assert tent.updates == 6 and tent.last_loss == pytest.approx(last_loss, rel=1e-6)
    expected_entropy = torch.cat([-(o.softmax(1) * o.log_softmax(1)).sum(1) for o in outputs]).mean()
    assert metrics[0]["entropy"] == pytest.approx(expected_entropy.item(), rel=1e-4)
    assert_state(model, before)

    # the same callback leaves predict alone: not one of its stages
    plain = torch.cat(make_trainer([]).predict(model, loader(x)))
    assert torch.equal(torch.cat(make_trainer([tent]).predict(model, loader(x))), plain)
