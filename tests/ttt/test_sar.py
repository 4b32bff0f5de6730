"""SAR against the authors' forward_and_adapt_sar with SAM's first and second step written out in the test."""

import functools
import math
import warnings

import pytest
import torch
from torch.utils.data import DataLoader
from ttt_models import (
    ConvNet,
    LogitNet,
    Recorder,
    batch_stats,
    check_restored_after_predict,
    check_restored_on_exception,
    entropy,
    images,
    loader,
    trainer,
)

import ttc_lightning as ttc

SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)


def sar_reference(net, params, batches, optimizer, e_margin=0.4, rho=0.05, reset_below=0.2, restrict=True):
    """forward_and_adapt_sar and SAM (the authors' code): entropy filter, backward, first step theta + rho g / ||g||,
    second forward, the filter again among the samples kept by the first (``restrict``), backward, parameters back to
    theta, base optimizer step; loss average 0.9 of the second loss; reset (model, optimizer, average) once the
    average falls below ``reset_below``. Where no sample passes a filter there is no step (the library's documented
    choice; the authors' code steps on a zero or NaN gradient).

    Returns per batch the outputs, the parameters after the batch and whether it updated, and the resets; and, per
    batch, how many samples are under the threshold at the perturbed point without the restriction."""
    opt = optimizer(params)
    source = [p.detach().clone() for p in params]
    average, resets, outputs, history, updated, unrestricted = None, 0, [], [], [], []
    for x in batches:
        if average is not None and average < reset_below:  # the authors reset right after the collapsing update
            with torch.no_grad():
                for p, p0 in zip(params, source, strict=True):
                    p.copy_(p0)
            opt, average, resets = optimizer(params), None, resets + 1
        out = net(x)
        margin = e_margin * math.log(out.shape[1])
        ent = entropy(out)
        assert ((ent.detach() - margin).abs() > 1e-3).all(), "entropy too close to the threshold"
        ids1 = torch.where(ent < margin)[0]
        step = False
        if not ids1.numel():
            unrestricted.append(None)
        else:
            ent[ids1].mean(0).backward()
            norm = torch.norm(torch.stack([p.grad.norm(2) for p in params]), 2)
            old = [p.data.clone() for p in params]
            with torch.no_grad():
                for p in params:
                    p.add_(p.grad * (rho / (norm + 1e-12)))
            opt.zero_grad()
            ent2 = entropy(net(x))
            assert ((ent2.detach() - margin).abs() > 1e-3).all(), "second entropy too close to the threshold"
            unrestricted.append(int((ent2 < margin).sum()))
            if restrict:
                ent2 = ent2[ids1]
            ids2 = torch.where(ent2 < margin)[0]
            if ids2.numel():
                loss = ent2[ids2].mean(0)
                loss.backward()
                average = loss.item() if average is None else 0.9 * average + 0.1 * loss.item()
                step = True
            for p, o in zip(params, old, strict=True):
                p.data = o
            if step:
                opt.step()
            opt.zero_grad()
        outputs.append(out.detach())
        history.append([p.detach().clone() for p in params])
        updated.append(step)
    return outputs, history, updated, resets, unrestricted


def row(c: int, value: float, classes: int = 4) -> torch.Tensor:
    v = torch.zeros(classes)
    v[c] = value
    return v


def logit_reference(batches, optimizer=SGD, **options):
    net = LogitNet()
    return sar_reference(net.head, list(net.head.parameters()), batches, optimizer, **options)


def run(model, callback, x, batch_size, names=None):
    """Predict ``x`` in batches of ``batch_size``, or the list of batches ``x`` as they are."""
    recorder = Recorder(callback, names)
    data = DataLoader(x, batch_size=None) if isinstance(x, list) else loader(x, batch_size)
    preds = trainer([callback, recorder]).predict(model, data)
    return preds, recorder


def assert_history(recorder, history):
    for got, want in zip(recorder.params, history, strict=True):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("e_margin", [0.95, 0.9])
def test_batchnorm_model_parity_with_sam_written_out(e_margin):
    x = images(32, seed=6)
    model = ConvNet(scale=15)
    sar = ttc.SAR(optimizer=SGD, e_margin=e_margin)  # default params="norm": the BatchNorm affine parameters here
    preds, rec = run(model, sar, x, 8, names=["net.1.weight", "net.1.bias"])
    net = batch_stats(model.net)
    outputs, history, updated, resets, _ = sar_reference(
        net, [net[1].weight, net[1].bias], list(x.split(8)), SGD, e_margin=e_margin
    )
    assert all(updated) and resets == 0
    for pred, out in zip(preds, outputs, strict=True):
        torch.testing.assert_close(pred, out, rtol=1e-5, atol=1e-5)
    assert_history(rec, history)
    assert sar.updates == 4 and sar.backwards == 8  # two backward passes per SAM update
    assert not torch.equal(history[-1][0], model.net[1].weight)


# Rows for LogitNet (4 classes, threshold 0.4 ln 4 = 0.555) at rho = 1: entropies at theta and, after the first step,
# at theta + rho g / ||g|| (computed once, asserted by the reference to stay clear of the threshold):
#   row(0, 4)    0.262 -> 1.346      kept first, fails second
#   row(0, 9)    0.004 -> 1.288      kept first, fails second
#   row(1, 2.9)  0.564 -> 0.533      NOT kept first, would pass second: the restriction must exclude it
#   row(3, 9)    0.004 -> 0.005      kept both times: the only sample of the second loss
#   row(2, 1)    1.268 -> 1.242      never kept
RESTRICTED = torch.stack([row(0, 4), row(0, 9), row(1, 2.9), row(3, 9), row(2, 1.0)])
# Without row(3, 9), nothing passes the second filter, although row(1, 2.9) would without the restriction.
NOTHING_SECOND = torch.stack([row(0, 4), row(0, 9), row(1, 2.9), row(2, 1.0)])


def test_second_filter_only_among_first_pass_kept_samples():
    batches = [RESTRICTED]
    preds, rec = run(LogitNet(), ttc.SAR(optimizer=SGD, rho=1.0, params="all"), RESTRICTED, 5)
    outputs, history, updated, _, would_pass = logit_reference(batches, rho=1.0)
    _, unrestricted, *_ = logit_reference(batches, rho=1.0, restrict=False)
    assert updated == [True] and would_pass == [2]
    torch.testing.assert_close(preds[0], outputs[0])
    assert_history(rec, history)
    gap = max((a - b).abs().max().item() for a, b in zip(history[0], unrestricted[0], strict=True))
    assert gap > 1e-3  # the restriction changes the update
    assert rec.column("kept_fraction") == [pytest.approx(0.6)]  # the first filter's fraction


def test_no_update_when_nothing_passes_the_second_filter():
    """A first batch updates (momentum buffer filled); on the second nothing passes the second filter: no step, so
    momentum must not move the parameters; no skip, no warning; one backward pass only."""
    batches = [RESTRICTED, NOTHING_SECOND]
    outputs, history, updated, _, would_pass = logit_reference(batches, rho=1.0, reset_below=0.0)
    assert updated == [True, False] and would_pass == [2, 1]  # preconditions of the construction
    sar = ttc.SAR(optimizer=SGD, rho=1.0, params="all", reset_below=0.0)  # no collapse reset in between
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        preds, rec = run(LogitNet(), sar, batches, None)
    mine = [w for w in caught if "SAR" in str(w.message) or "skip" in str(w.message)]
    assert not mine, [str(w.message) for w in mine]
    loader_preds = torch.cat(preds)
    torch.testing.assert_close(loader_preds, torch.cat(outputs))
    assert rec.column("updates") == [1, 1]
    assert rec.column("backwards") == [2, 3]
    assert rec.column("skipped") == [0, 0]
    assert math.isnan(rec.figures[1]["last_loss"])
    for a, b in zip(rec.params[0], rec.params[1], strict=True):
        assert torch.equal(a, b)  # untouched, bitwise (perturbation undone exactly, no momentum step)
    assert_history(rec, history)


def test_no_update_and_no_backward_when_nothing_passes_the_first_filter():
    x = torch.stack([torch.zeros(4), row(1, 0.5), row(2, 1.0)])
    sar = ttc.SAR(optimizer=SGD, params="all")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        preds, _ = run(LogitNet(), sar, x, 3)
    assert not [w for w in caught if "SAR" in str(w.message)]
    assert sar.updates == 0 and sar.backwards == 0 and sar.skipped == 0 and sar.kept_fraction == 0.0
    torch.testing.assert_close(preds[0], x)


class ParamsAtStep(torch.optim.SGD):
    """SGD that records the parameters it is about to update and the ones it leaves."""

    def __init__(self, params, log, **options):
        super().__init__(params, **options)
        self.log = log

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        self.log.append(("before", [p.detach().clone() for p in params]))
        result = super().step(closure)
        self.log.append(("after", [p.detach().clone() for p in params]))
        return result


def test_base_step_starts_from_theta_exactly():
    """The parameters the base optimizer updates are bitwise those before the SAM perturbation: the source values
    for the first update, the previous update's result afterwards."""
    log: list = []
    model = ConvNet(scale=15)
    source = [model.net[1].weight.detach().clone(), model.net[1].bias.detach().clone()]
    opt = functools.partial(ParamsAtStep, log=log, lr=0.05, momentum=0.9)
    sar = ttc.SAR(optimizer=opt, e_margin=0.95, rho=0.5)
    trainer([sar]).predict(model, loader(images(32, seed=6)))
    assert [kind for kind, _ in log] == ["before", "after"] * 4
    previous = source
    for (_, before), (_, after) in zip(log[::2], log[1::2], strict=True):
        for b, p in zip(before, previous, strict=True):
            assert torch.equal(b, p)
        previous = after
    assert not torch.equal(log[-1][1][0], source[0])


def collapse_batches(n=10):
    x = torch.stack([row(0, 3.0), row(1, 3.2), row(2, 3.4), row(3, 3.6)])
    return [x] * n


def test_reset_on_collapse_matches_the_authors_loop():
    """Fast SGD on confident-enough rows drives the second-pass entropy (and its 0.9 average) down; once the average
    falls below reset_below the model returns to the source: the next batch's output is the source output."""
    batches = collapse_batches()
    opt = functools.partial(torch.optim.SGD, lr=2.0, momentum=0.9)
    outputs, history, updated, resets, _ = logit_reference(batches, optimizer=opt, reset_below=0.2)
    assert resets >= 1 and all(updated)  # precondition: the construction collapses within the stream
    sar = ttc.SAR(optimizer=opt, params="all", reset_below=0.2)
    preds, rec = run(LogitNet(), sar, torch.cat(batches), 4)
    for pred, out in zip(preds, outputs, strict=True):
        torch.testing.assert_close(pred, out, rtol=1e-5, atol=1e-5)
    assert_history(rec, history)
    assert sar.resets == resets
    first_reset = rec.column("resets").index(1)
    assert first_reset > 1  # the average had to fall: not an immediate reset
    torch.testing.assert_close(preds[first_reset], batches[0])  # the source model again (identity head)


def test_no_reset_while_the_average_stays_above_the_threshold():
    batches = collapse_batches(6)
    opt = functools.partial(torch.optim.SGD, lr=2.0, momentum=0.9)
    sar = ttc.SAR(optimizer=opt, params="all", reset_below=0.0)
    run(LogitNet(), sar, torch.cat(batches), 4)
    assert sar.resets == 0 and sar.updates == 6


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_group_and_layer_norm_models_adapt_at_batch_size_one(norm):
    """Default params="norm" picks the GroupNorm / LayerNorm affine parameters; batch size 1 works (no batch
    statistics anywhere) and matches SAR written out; the convolution and the head never move."""
    x = images(4, seed=2)
    model = ConvNet(norm=norm, scale=15)
    index = 1 if norm == "group" else 4
    assert isinstance(model.net[index], torch.nn.GroupNorm if norm == "group" else torch.nn.LayerNorm)
    sar = ttc.SAR(optimizer=SGD, e_margin=0.9, persistence=ttc.Persistence(keep_adapted=True))
    preds, rec = run(model, sar, x, 1, names=[f"net.{index}.weight", f"net.{index}.bias"])
    net = ConvNet(norm=norm, scale=15).net
    outputs, history, updated, *_ = sar_reference(
        net, [net[index].weight, net[index].bias], list(x.split(1)), SGD, e_margin=0.9
    )
    assert sum(updated) >= 2
    assert sar.updates == sum(updated)
    for pred, out in zip(preds, outputs, strict=True):
        torch.testing.assert_close(pred, out, rtol=1e-5, atol=1e-5)
    assert_history(rec, history)
    source = ConvNet(norm=norm, scale=15).net
    assert not torch.equal(model.net[index].weight, source[index].weight)  # kept adapted
    assert torch.equal(model.net[0].weight, source[0].weight)
    assert torch.equal(model.net[-1].weight, source[-1].weight)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        (dict(rho=0.0), "rho"),
        (dict(rho=-1.0), "rho"),
        (dict(e_margin=0.0), "e_margin"),
        (dict(reset_below=-1), "reset_below"),  # the message names the argument the user passed
    ],
)
def test_bad_arguments(options, name):
    with pytest.raises(ValueError, match=name):
        ttc.SAR(**options)


def test_restored_after_predict_with_default_trainer():
    check_restored_after_predict(ConvNet(scale=15), ttc.SAR(optimizer=SGD, e_margin=0.95), images(24))


@pytest.mark.parametrize("fail_call", [1, 2], ids=["first_forward", "perturbed_forward"])
def test_restored_on_an_exception_in_the_second_batch(fail_call):
    """Call 2 of a batch is the forward at the perturbed parameters theta + rho g / ||g||."""
    check_restored_on_exception(ConvNet(scale=15), ttc.SAR(optimizer=SGD, e_margin=0.95), images(24), fail_call)
