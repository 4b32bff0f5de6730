"""TestTimeTraining options (scheduler, clipping, tol, resets, figures) and bad input, against loops written out."""

import copy
import functools
import math
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ttc_lightning as ttc
from ttc_lightning.ttt.objectives import Loss

BN = nn.modules.batchnorm._BatchNorm


class Net(ttc.TestTimeComputeMixin, L.LightningModule):
    """conv 3->8, BatchNorm2d, ReLU, pool, linear 8->4; counts forward calls."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
        )
        with torch.no_grad():
            self.net[1].running_mean.uniform_(-1, 1)
            self.net[1].running_var.uniform_(0.5, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def images(n: int = 24, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def loader(x: torch.Tensor, batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(x), batch_size=batch_size)


def entropy(out: torch.Tensor) -> torch.Tensor:
    return -(out.softmax(1) * out.log_softmax(1)).sum(1).mean(0)


def sgd(lr: float = 0.5, momentum: float = 0.0):
    return functools.partial(torch.optim.SGD, lr=lr, momentum=momentum)


def configure(net: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    """TENT's configuration: BatchNorm with batch statistics, only its affine parameters trainable."""
    net = copy.deepcopy(net).train()
    net.requires_grad_(False)
    params = []
    for m in net.modules():
        if isinstance(m, BN):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
            m.requires_grad_(True)
            params += [m.weight, m.bias]
    return net, params


def reference(net, batches, update, steps=1, objective=entropy, tol=None, reset_before=()):
    """The adaptation loop written out. ``update(params, k)`` applies update number ``k`` (since the last reset) from
    the gradients in ``p.grad``; resets return to the source model before the batches in ``reset_before``.
    Returns per-batch outputs, parameters after each batch, forward calls, and the last loss."""
    outputs, history, forwards, loss = [], [], 0, None
    model, params = configure(net)
    k = 0
    for i, x in enumerate(batches):
        if i in reset_before:
            model, params = configure(net)
            k = 0
        previous = None
        for _ in range(steps):
            out = model(x)
            forwards += 1
            loss = objective(out)
            loss.backward()
            with torch.no_grad():
                update(params, k)
            for p in params:
                p.grad = None
            k += 1
            if tol is not None and previous is not None and abs(previous - loss.item()) < tol:
                break
            previous = loss.item()
        outputs.append(out.detach())
        history.append([p.detach().clone() for p in params])
    return outputs, history, forwards, loss.item()


def plain_sgd(lr):
    def update(params, k):
        for p in params:
            p -= lr * p.grad

    return update


class ParamProbe(L.Callback):
    """The adapted parameters after every batch (of every dataloader)."""

    def __init__(self) -> None:
        self.history = []

    def on_predict_batch_end(self, trainer, pl_module, *args, **kwargs):
        bn = pl_module.net[1]
        self.history.append([bn.weight.detach().clone(), bn.bias.detach().clone()])


def assert_history(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g, w, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def assert_outputs(preds, outputs) -> None:
    torch.testing.assert_close(torch.cat(preds), torch.cat(outputs), rtol=1e-5, atol=1e-5)


def run(model, callback, data, make_trainer, *extra, **kwargs):
    probe = ParamProbe()
    trainer = make_trainer([callback, probe, *extra], **kwargs)
    return trainer.predict(model, data), probe, trainer


def snapshot(model) -> dict:
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": sum(len(m._forward_pre_hooks) + ("forward" in vars(m)) for m in model.modules()),
    }


def assert_restored(model, before) -> None:
    after = snapshot(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, value in before["tensors"].items():
        assert torch.equal(after["tensors"][name], value), name
    assert after["grads"] == before["grads"]  # all None: Lightning zeroes gradients before a stage
    assert after["flags"] == before["flags"] and after["modes"] == before["modes"] and after["hooks"] == before["hooks"]
    assert "forward" not in model.__dict__


# Scheduler ----------------------------------------------------------------------------------------------------------


def test_scheduler_is_stepped_after_every_update(make_trainer):
    model, x = Net(), images()
    schedulers = []

    def scheduler(opt):
        schedulers.append(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
        return schedulers[-1]

    tt = ttc.TestTimeTraining(optimizer=sgd(0.8), updates=ttc.Updates(scheduler=scheduler), steps=2)
    preds, probe, _ = run(model, tt, loader(x), make_trainer)

    def update(params, k):  # SGD with the learning rate of update k written out: 0.8 * 0.5**k
        for p in params:
            p -= 0.8 * 0.5**k * p.grad

    outputs, history, _, _ = reference(model.net, x.split(8), update, steps=2)
    assert_outputs(preds, outputs)
    assert_history(probe.history, history)
    assert len(schedulers) == 1 and tt.updates == 6
    assert schedulers[0].optimizer.param_groups[0]["lr"] == pytest.approx(0.8 * 0.5**6)


def test_a_reset_starts_a_fresh_optimizer_and_scheduler(make_trainer):
    model, x = Net(), images()
    schedulers = []

    def scheduler(opt):
        schedulers.append(torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
        return schedulers[-1]

    tt = ttc.TestTimeTraining(
        optimizer=sgd(0.8), updates=ttc.Updates(scheduler=scheduler), steps=2, resets=ttc.Resets(every="batch")
    )
    preds, probe, _ = run(model, tt, loader(x), make_trainer)

    def update(params, k):
        for p in params:
            p -= 0.8 * 0.5**k * p.grad

    outputs, history, _, _ = reference(model.net, x.split(8), update, steps=2, reset_before={1, 2})
    assert_outputs(preds, outputs)
    assert_history(probe.history, history)
    assert len(schedulers) == 3 and len({id(s.optimizer) for s in schedulers}) == 3
    assert [s.optimizer.param_groups[0]["lr"] for s in schedulers] == pytest.approx([0.8 * 0.25] * 3)


# Gradient clipping --------------------------------------------------------------------------------------------------


def huge(out):
    return 1e4 * entropy(out)  # gradients far above the clipping thresholds below


def test_clip_grad_norm_bounds_the_total_norm(make_trainer):
    model, x = Net(), images()
    tt = ttc.TestTimeTraining(optimizer=sgd(1.0), objective=huge, updates=ttc.Updates(clip_grad=0.05, clip_mode="norm"))
    preds, probe, _ = run(model, tt, loader(x), make_trainer)

    def update(params, k):  # SGD lr=1 on gradients scaled to total L2 norm <= 0.05, written out
        total = torch.sqrt(sum((p.grad**2).sum() for p in params))
        scale = min(1.0, 0.05 / (total.item() + 1e-6))
        for p in params:
            p -= scale * p.grad

    outputs, history, _, _ = reference(model.net, x.split(8), update, objective=huge)
    assert_outputs(preds, outputs)
    assert_history(probe.history, history)
    source = [model.net[1].weight.detach(), model.net[1].bias.detach()]
    step = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(probe.history[0], source, strict=True)))
    assert step.item() == pytest.approx(0.05, rel=1e-3)  # clipping bound: lr 1 moves exactly the clipped norm


def test_clip_grad_value_clamps_every_component(make_trainer):
    model, x = Net(), images()
    tt = ttc.TestTimeTraining(
        optimizer=sgd(1.0), objective=huge, updates=ttc.Updates(clip_grad=0.01, clip_mode="value")
    )
    preds, probe, _ = run(model, tt, loader(x), make_trainer)

    def update(params, k):
        for p in params:
            p -= p.grad.clamp(-0.01, 0.01)

    outputs, history, _, _ = reference(model.net, x.split(8), update, objective=huge)
    assert_outputs(preds, outputs)
    assert_history(probe.history, history)
    moved = probe.history[0][0] - model.net[1].weight.detach()
    assert (moved.abs() <= 0.01 + 1e-7).all() and (moved.abs() > 0.0099).sum() >= 6  # the clip binds


# tol ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("tol", "per_batch"), [(1e9, 2), (0.0, 5)])
def test_tol_extremes(tol, per_batch, make_trainer):
    """A huge tol stops each batch after its second step; tol=0 never stops early (|change| < 0 never holds)."""
    model, x = Net(), images()
    tt = ttc.TestTimeTraining(optimizer=sgd(0.5), steps=5, updates=ttc.Updates(tol=tol))
    preds, probe, _ = run(model, tt, loader(x), make_trainer)
    outputs, history, forwards, _ = reference(model.net, x.split(8), plain_sgd(0.5), steps=5, tol=tol)
    assert model.calls == forwards == 3 * per_batch
    assert tt.updates == 3 * per_batch
    assert_outputs(preds, outputs)
    assert_history(probe.history, history)


def test_tol_stops_each_batch_where_the_loss_settles(make_trainer):
    """With SGD lr=1 the loss changes grow as the adaptation goes on (about 0.0026 at first, 0.0032 and more later):
    tol=0.003 stops the first two batches after two steps and lets the last two run all six."""
    model, x = Net(), images(32)
    tt = ttc.TestTimeTraining(optimizer=sgd(1.0), steps=6, updates=ttc.Updates(tol=0.003))
    preds, probe, _ = run(model, tt, loader(x), make_trainer)
    outputs, history, forwards, _ = reference(model.net, x.split(8), plain_sgd(1.0), steps=6, tol=0.003)
    assert forwards == 2 + 2 + 6 + 6  # the rule really decides per batch
    assert model.calls == forwards and tt.updates == forwards
    assert_outputs(preds, outputs)
    assert_history(probe.history, history)


# Resets -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reset", "steps", "reset_before"),
    [("never", 1, set()), ("batch", 2, {1, 2, 3, 4}), (2, 1, {2, 4}), (3, 2, {2, 4}), (4, 2, {2, 4})],
)
def test_reset_policies_match_the_loop_with_resets(reset, steps, reset_before, make_trainer):
    """An int N resets before the first batch that starts with at least N updates since the last reset."""
    model, x = Net(), images(40)
    tt = ttc.TestTimeTraining(optimizer=sgd(0.5, momentum=0.9), steps=steps, resets=ttc.Resets(every=reset))
    preds, probe, _ = run(model, tt, loader(x), make_trainer)
    momentum = {}

    def update(params, k):  # SGD with momentum 0.9 written out; the buffers start again after a reset
        for i, p in enumerate(params):
            buf = p.grad.clone() if k == 0 else 0.9 * momentum[i] + p.grad
            momentum[i] = buf
            p -= 0.5 * buf

    outputs, history, _, _ = reference(model.net, x.split(8), update, steps=steps, reset_before=reset_before)
    assert_outputs(preds, outputs)
    assert_history(probe.history, history)
    assert tt.resets == len(reset_before) and tt.updates == 5 * steps


@pytest.mark.parametrize(("reset", "resets"), [("dataloader", 1), ("never", 0)])
def test_reset_per_dataloader(reset, resets, make_trainer):
    model, a, b = Net(), images(16, seed=1), images(24, seed=2) * 0.5 - 1
    tt = ttc.TestTimeTraining(optimizer=sgd(0.5), resets=ttc.Resets(every=reset))
    preds, probe, _ = run(model, tt, [loader(a), loader(b)], make_trainer)
    assert [len(p) for p in preds] == [2, 3]
    outputs, history, _, _ = reference(
        model.net, [*a.split(8), *b.split(8)], plain_sgd(0.5), reset_before={2} if resets else set()
    )
    assert_outputs(preds[0] + preds[1], outputs)
    assert_history(probe.history, history)
    assert tt.resets == resets


def test_reset_on_collapse_follows_the_smoothed_loss(make_trainer):
    """An objective whose values are scripted (the entropy rescaled to a chosen value, gradients intact): the smoothed
    loss (0.9 * average + 0.1 * loss) falls under 0.85 after the seventh batch (with a smoothing of 0.8 it would
    after the fifth), then every loss is far under it."""
    targets = [1.0, 1.0, 0.6, 0.6, 0.6, 0.6, 0.01, 0.01, 0.01]

    def scripted():
        calls = []

        def objective(out):
            h = entropy(out)
            value = targets[len(calls)]
            calls.append(value)
            return h / h.detach() * value

        return objective

    model, x = Net(), images(72)
    tt = ttc.TestTimeTraining(optimizer=sgd(0.5), objective=scripted(), resets=ttc.Resets(on_collapse=0.85))
    preds, probe, _ = run(model, tt, loader(x), make_trainer)

    # the collapse rule written out
    reset_before, average = set(), None
    for i, value in enumerate(targets):
        if average is not None and average < 0.85:
            reset_before.add(i)
            average = None
        average = value if average is None else 0.9 * average + 0.1 * value
    assert reset_before == {7, 8}

    outputs, history, _, _ = reference(
        model.net, x.split(8), plain_sgd(0.5), objective=scripted(), reset_before=reset_before
    )
    assert_outputs(preds, outputs)
    assert_history(probe.history, history)
    assert tt.resets == 2 and tt.updates == 9 and tt.last_loss == pytest.approx(0.01)


def test_reset_on_collapse_above_every_entropy_is_episodic(make_trainer):
    model, x = Net(), images()
    tt = ttc.TestTimeTraining(optimizer=sgd(0.5), resets=ttc.Resets(on_collapse=10.0))
    preds, probe, _ = run(model, tt, loader(x), make_trainer)
    outputs, history, _, _ = reference(model.net, x.split(8), plain_sgd(0.5), reset_before={1, 2})
    assert_outputs(preds, outputs)
    assert_history(probe.history, history)
    assert tt.resets == 2


def test_manual_reset_from_a_user_callback(make_trainer):
    model, x = Net(), images(32)
    source = [p.detach().clone() for p in model.net[1].parameters()]
    tt = ttc.TestTimeTraining(optimizer=sgd(0.5))
    at_reset = []

    class Resetter(L.Callback):
        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 1:
                tt.reset()
                at_reset.append([p.detach().clone() for p in pl_module.net[1].parameters()])

    preds, probe, _ = run(model, tt, loader(x), make_trainer, Resetter())
    outputs, history, _, _ = reference(model.net, x.split(8), plain_sgd(0.5), reset_before={2})
    assert_outputs(preds, outputs)
    assert_history(probe.history, history)
    assert all(torch.equal(a, b) for a, b in zip(at_reset[0], source, strict=True))  # back to source at once
    assert tt.resets == 1 and tt.updates == 4


def test_reset_outside_a_run_is_a_runtime_error(make_trainer):
    model = Net()
    tt = ttc.TestTimeTraining(optimizer=sgd(0.5))
    with pytest.raises(RuntimeError, match="reset"):
        tt.reset()
    make_trainer([tt]).predict(model, loader(images(16)))
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="reset"):  # the run is over: nothing adapted to reset
        tt.reset()
    assert_restored(model, before)


# Figures ------------------------------------------------------------------------------------------------------------


def test_figures(make_trainer):
    model, x = Net(), images()
    tt = ttc.TestTimeTraining(optimizer=sgd(0.5), steps=3)
    assert math.isnan(tt.last_loss) and (tt.updates, tt.resets, tt.skipped) == (0, 0, 0)
    run(model, tt, loader(x), make_trainer)
    _, _, _, last = reference(model.net, x.split(8), plain_sgd(0.5), steps=3)
    assert tt.last_loss == pytest.approx(last, rel=1e-5)
    assert (tt.updates, tt.resets, tt.skipped) == (9, 0, 0)
    assert math.isnan(tt.kept_fraction)  # no filtering objective


def test_kept_fraction_of_a_filtering_objective(make_trainer):
    def filtered(out):
        per_sample = -(out.softmax(1) * out.log_softmax(1)).sum(1)
        kept = torch.arange(len(out)) % 4 == 0
        return Loss(per_sample[kept].mean(), kept)

    model, x = Net(), images(20)  # batches 8, 8, 4: the last keeps 1 of 4
    tt = ttc.TestTimeTraining(optimizer=sgd(0.5), objective=filtered)
    preds, probe, _ = run(model, tt, loader(x), make_trainer)
    outputs, history, _, _ = reference(model.net, x.split(8), plain_sgd(0.5), objective=lambda o: filtered(o).value)
    assert_outputs(preds, outputs)
    assert_history(probe.history, history)
    assert tt.kept_fraction == pytest.approx(0.25)


# Bad input ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": -1}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"steps": True}, "steps"),
        ({"objective": "entropie"}, "objective"),
        ({"norm": "running"}, "norm"),
        ({"stages": ("fit",)}, "stages"),
    ],
)
def test_bad_arguments_are_value_errors_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        ttc.TestTimeTraining(optimizer=sgd(0.5), **kwargs)


@pytest.mark.parametrize(
    ("group", "kwargs", "name"),
    [
        (ttc.Resets, {"every": "sometimes"}, "resets.every"),
        (ttc.Resets, {"every": 0}, "resets.every"),
        (ttc.Updates, {"clip_mode": "x"}, "updates.clip_mode"),
        (ttc.Updates, {"clip_grad": -1.0}, "updates.clip_grad"),
        (ttc.Updates, {"tol": -1e-3}, "updates.tol"),
        (ttc.Resets, {"on_collapse": -0.5}, "resets.on_collapse"),
    ],
)
def test_bad_grouped_options_are_value_errors_naming_them(group, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        group(**kwargs)


def test_a_group_of_the_wrong_kind_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"`resets`=.*must be a ttc_lightning.Resets"):
        ttc.TestTimeTraining(optimizer=sgd(0.5), resets=ttc.Updates())
    with pytest.raises(TypeError, match="`anchors`"):
        ttc.TestTimeTraining(optimizer=sgd(0.5), anchors=[ttc.Updates()])


def test_preset_arguments_are_checked_too():
    with pytest.raises(ValueError, match="`steps`"):
        ttc.Tent(steps=0)
    with pytest.raises(TypeError, match="`optimizer`"):
        ttc.Tent(optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))  # an optimizer, not a factory
    with pytest.raises(TypeError, match="`objective`"):
        ttc.TestTimeTraining(objective=3)


def plain_predictions(model, x, make_trainer) -> torch.Tensor:
    return torch.cat(make_trainer([]).predict(model, loader(x)))


@pytest.mark.parametrize(
    "factory",
    [functools.partial(torch.optim.SGD, lr=-1.0), functools.partial(torch.optim.SGD, lr=0.1, bogus=1)],
    ids=["bad_value", "bad_keyword"],
)
def test_failing_optimizer_factory_is_a_clear_error_before_any_batch(factory, make_trainer):
    """A start that fails must leave nothing behind: the BatchNorm layers normalise with their source statistics
    again (a plain predict afterwards gives the plain predictions of before)."""
    model, x = Net(), images(16)
    plain = plain_predictions(model, x, make_trainer)
    before, calls = snapshot(model), model.calls
    trainer = make_trainer([ttc.Tent(optimizer=factory)])
    with pytest.raises(ValueError, match=r"`optimizer` factory .* failed on the 2 adapted parameters"):
        trainer.predict(model, loader(x))
    assert model.calls == calls  # no batch ran
    assert trainer.predict_loop.inference_mode is True
    assert torch.equal(plain_predictions(model, x, make_trainer), plain)
    assert_restored(model, before)


def test_factory_returning_a_non_optimizer_is_a_type_error(make_trainer):
    model = Net()
    trainer = make_trainer([ttc.Tent(optimizer=lambda params: list(params))])
    with pytest.raises(TypeError, match="`optimizer` factory returned list, not a torch Optimizer"):
        trainer.predict(model, loader(images(16)))
    assert model.calls == 0


def test_objective_returning_a_non_scalar_names_the_shape(make_trainer):
    model = Net()
    before = snapshot(model)
    per_sample = ttc.TestTimeTraining(optimizer=sgd(0.5), objective=lambda out: -(out.softmax(1) * out).sum(1))
    trainer = make_trainer([per_sample])
    with pytest.raises(ValueError, match=r"scalar tensor; it returned shape \(8,\)"):
        trainer.predict(model, loader(images(16)))
    assert_restored(model, before)
    assert trainer.predict_loop.inference_mode is True


def test_error_between_backward_and_zero_grad_leaves_no_gradients(make_trainer):
    """An optimizer whose second step raises, after backward filled the gradients: parameters, gradients and flags
    come back."""

    class Failing(torch.optim.SGD):
        steps = 0

        def step(self, closure=None):
            Failing.steps += 1
            if Failing.steps == 2:
                raise RuntimeError("step failed")
            return super().step(closure)

    model = Net()
    before = snapshot(model)
    trainer = make_trainer([ttc.Tent(optimizer=functools.partial(Failing, lr=0.5))])
    with pytest.raises(RuntimeError, match="step failed"):
        trainer.predict(model, loader(images(24)))
    assert model.net[1].weight.grad is None and model.net[1].bias.grad is None
    assert_restored(model, before)


def poison_second_call(kind: str):
    calls = []

    def objective(out):
        calls.append(None)
        loss = entropy(out)
        if len(calls) != 2:
            return loss
        if kind == "loss":
            return loss * float("nan")
        zero = (out - out.detach()).abs().sum()  # value 0, gradient of sqrt at 0 is infinite: 0 * inf = nan
        return loss + 0.0 * zero.sqrt()

    return objective


@pytest.mark.parametrize("kind", ["input", "loss", "gradients"])
def test_non_finite_batch_is_skipped_and_later_batches_adapt_normally(kind, make_trainer):
    model, x = Net(), images(32)
    data = x.clone()
    objective = entropy
    if kind == "input":
        data[9, 1, 3, 3] = float("nan")  # second batch
    else:
        objective = poison_second_call(kind)
    tt = ttc.TestTimeTraining(optimizer=sgd(0.5, momentum=0.9), objective=objective)
    with pytest.warns(UserWarning, match="non-finite"):
        preds, probe, _ = run(model, tt, loader(data), make_trainer)

    # reference: the same stream without the second batch (SGD with momentum: a skipped step must leave no trace)
    momentum = {}

    def update(params, k):
        for i, p in enumerate(params):
            momentum[i] = p.grad.clone() if k == 0 else 0.9 * momentum[i] + p.grad
            p -= 0.5 * momentum[i]

    batches = x.split(8)
    outputs, history, _, _ = reference(model.net, [batches[0], *batches[2:]], update)
    torch.testing.assert_close(preds[0], outputs[0], rtol=1e-5, atol=1e-5)
    assert_outputs(preds[2:], outputs[1:])
    assert_history([probe.history[0], *probe.history[2:]], history)
    assert all(torch.equal(a, b) for a, b in zip(probe.history[1], probe.history[0], strict=True))  # untouched
    assert tt.skipped == 1 and tt.updates == 3
    if kind == "input":
        assert not torch.isfinite(preds[1]).all()
    else:
        torch.testing.assert_close(preds[1], configure_forward(model.net, history[0], batches[1]), rtol=1e-5, atol=1e-5)


def configure_forward(net, params, x):
    """The configured model with the given BatchNorm affine parameters, on ``x``."""
    model, own = configure(net)
    with torch.no_grad():
        for p, value in zip(own, params, strict=True):
            p.copy_(value)
        return model(x)


# Precision ----------------------------------------------------------------------------------------------------------


def test_bf16_true_parameters_are_refused_clearly(make_trainer):
    model = Net()
    trainer = make_trainer([ttc.Tent()], precision="bf16-true")
    with pytest.raises(ValueError, match=r"low-precision parameters .*bfloat16.*bf16-mixed"):
        trainer.predict(model, loader(images(16)))
    assert model.calls == 0
    assert trainer.predict_loop.inference_mode is True
    assert all("forward" not in vars(m) for m in model.modules())  # no BatchNorm policy left installed
    assert all(p.requires_grad for p in model.parameters())


def test_bf16_mixed_on_cpu_matches_fp32_within_bf16_tolerance(make_trainer):
    x = images()
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        model = Net()
        before = snapshot(model)
        tt = ttc.Tent(optimizer=sgd(0.5), steps=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            preds, probe, _ = run(model, tt, loader(x), make_trainer, precision=precision)
        runs[precision] = (torch.cat(preds).float(), probe.history[-1])
        assert tt.updates == 6 and tt.skipped == 0
        assert_restored(model, before)
        assert model.net[1].weight.dtype == torch.float32
    out32, params32 = runs["32-true"]
    out16, params16 = runs["bf16-mixed"]
    torch.testing.assert_close(out16, out32, rtol=0.05, atol=0.05)
    for a, b in zip(params16, params32, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)
    assert not torch.equal(out16, out32)  # autocast really ran
