"""MEMO against marginal entropy minimisation written out in the test (views from RandomAugment with the same seed,
BatchNorm statistics mixed with the source ones)."""

import copy
import functools
import math

import pytest
import torch
from torch import nn
from ttt_models import (
    ConvNet,
    Recorder,
    batch_stats,
    check_restored_after_predict,
    check_restored_on_exception,
    images,
    loader,
    trainer,
)

import ttc_lightning as ttc
from ttc_lightning.ttt.memo import marginal_entropy

SGD = functools.partial(torch.optim.SGD, lr=0.05)
ADAM = functools.partial(torch.optim.Adam, lr=0.01)
ALPHA = 16 / 17


def mixed_forward(net: nn.Sequential, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """``net`` with every BatchNorm2d normalising by ``alpha * running + (1 - alpha) * batch`` (mean and biased
    variance), the rest as in eval mode."""
    for m in net:
        if isinstance(m, nn.BatchNorm2d):
            mean = alpha * m.running_mean + (1 - alpha) * x.mean((0, 2, 3))
            var = alpha * m.running_var + (1 - alpha) * x.var((0, 2, 3), unbiased=False)
            x = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + m.eps)
            x = x * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)
        else:
            x = m(x)
    return x


def memo_reference(net, batches, optimizer, views, seed, alpha=ALPHA, steps=1, episodic=True):
    """MEMO: per batch (from the source model and a fresh optimizer when episodic), ``steps`` times: ``views``
    augmented copies of the batch, loss = mean over inputs of the entropy of the views' mean softmax, one update of
    all parameters; the prediction is a forward of the original batch through the updated model."""
    source = copy.deepcopy(net)
    augment = ttc.RandomAugment(seed=seed)
    model = copy.deepcopy(source)
    opt = optimizer(model.parameters())
    outputs = []
    for x in batches:
        if episodic:
            model = copy.deepcopy(source)
            opt = optimizer(model.parameters())
        for _ in range(steps):
            v = augment(x.repeat(views, 1, 1, 1))
            logits = mixed_forward(model, v, alpha).view(views, x.shape[0], -1)
            mean = logits.softmax(2).mean(0)
            loss = -(mean * mean.log()).sum(1).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            outputs.append(mixed_forward(model, x, alpha))
    return outputs, model


def predict(model, callbacks, x, batch_size=8):
    return trainer(callbacks).predict(model, loader(x, batch_size))


@pytest.mark.parametrize(
    ("optimizer", "episodic", "steps"),
    [(SGD, True, 1), (ADAM, True, 2), (SGD, False, 1), (ADAM, False, 1)],
    ids=["sgd_episodic", "adam_episodic_2steps", "sgd_online", "adam_online"],
)
def test_parity_with_marginal_entropy_written_out(optimizer, episodic, steps):
    x = images(24, seed=4)
    model = ConvNet(scale=5)
    memo = ttc.MEMO(optimizer=optimizer, views=3, augment=ttc.RandomAugment(seed=7), steps=steps, episodic=episodic)
    recorder = Recorder(memo)
    preds = trainer([memo, recorder]).predict(model, loader(x))
    outputs, _ = memo_reference(model.net, list(x.split(8)), optimizer, 3, 7, steps=steps, episodic=episodic)
    for pred, out in zip(preds, outputs, strict=True):
        torch.testing.assert_close(pred, out, rtol=1e-5, atol=1e-5)
    assert memo.updates == 3 * steps
    assert recorder.column("resets") == ([0, 1, 2] if episodic else [0, 0, 0])
    # MEMO predicts after its update: one forward of all views per step, then one of the original batch.
    assert model.calls == 3 * (steps + 1)


def test_prediction_comes_after_the_update():
    """With a learning rate of zero the prediction is the source model's (mixed statistics); with a real one it is
    not, and it equals the updated model's forward."""
    x = images(8, seed=4)
    model = ConvNet(scale=5)
    still = predict(model, [ttc.MEMO(optimizer=functools.partial(torch.optim.SGD, lr=0.0), views=2)], x)[0]
    with torch.no_grad():
        torch.testing.assert_close(still, mixed_forward(model.net, x, ALPHA))
    moved = predict(model, [ttc.MEMO(optimizer=functools.partial(torch.optim.SGD, lr=0.5), views=2)], x)[0]
    assert (moved - still).abs().max() > 1e-3


def test_defaults_one_input_at_a_time():
    """Defaults: SGD lr 0.005, 16 views of RandomAugment(seed 0), alpha 16/17, episodic; batch size 1 (the paper's
    setting)."""
    x = images(3, seed=8)
    model = ConvNet(scale=5)
    preds = predict(model, [ttc.MEMO()], x, batch_size=1)
    outputs, _ = memo_reference(model.net, list(x.split(1)), functools.partial(torch.optim.SGD, lr=0.005), 16, 0)
    for pred, out in zip(preds, outputs, strict=True):
        torch.testing.assert_close(pred, out, rtol=1e-5, atol=1e-5)


def test_alpha_weights_the_source_statistics():
    x = images(8, seed=4)
    model = ConvNet(scale=5)
    memo = ttc.MEMO(optimizer=SGD, views=2, augment=ttc.RandomAugment(seed=1), alpha=0.5)
    pred = predict(model, [memo], x)[0]
    out, _ = memo_reference(model.net, [x], SGD, 2, 1, alpha=0.5)
    torch.testing.assert_close(pred, out[0], rtol=1e-5, atol=1e-5)
    other, _ = memo_reference(model.net, [x], SGD, 2, 1)
    assert (other[0] - pred).abs().max() > 1e-3


def test_marginal_entropy_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 6, generator=g) * torch.tensor([0.1, 1.0, 10.0, 60.0, 3.0]).view(5, 1, 1)
    probs = logits.double().softmax(2).mean(0)
    direct = -(probs * probs.clamp_min(1e-300).log()).sum(1).mean()
    got = marginal_entropy(logits)
    assert got.shape == () and torch.isfinite(got)
    torch.testing.assert_close(got.double(), direct, rtol=1e-5, atol=1e-6)


def test_marginal_entropy_special_cases():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 3, generator=g)
    one_view = -(logits[0].softmax(1) * logits[0].log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(marginal_entropy(logits), one_view)  # one view: the mean entropy
    confident = torch.tensor([[[100.0, 0.0, 0.0]], [[0.0, 100.0, 0.0]]])  # two sure views that disagree
    torch.testing.assert_close(marginal_entropy(confident), torch.tensor(math.log(2)))
    uniform = torch.zeros(3, 2, 5)
    torch.testing.assert_close(marginal_entropy(uniform), torch.tensor(math.log(5)))
    huge = torch.tensor([[[1e4, -1e4]], [[-1e4, 1e4]]], requires_grad=True)
    value = marginal_entropy(huge)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(huge.grad).all()


@pytest.mark.parametrize("chunk_size", [1, None], ids=["views_one_by_one", "views_stacked"])
def test_composed_with_tta_predicts_the_merged_adapted_model(chunk_size):
    """The loss is MEMO's own (random views through the plain forward); the prediction is the mean over identity and
    h-flip of the adapted model, each view normalised with its own (mixed) statistics or, stacked, together."""
    x = images(16, seed=4)
    model = ConvNet(scale=5)
    memo = ttc.MEMO(optimizer=SGD, views=2, augment=ttc.RandomAugment(seed=3))
    tta = ttc.TestTimeAugmentation(transforms="hflip", chunk_size=chunk_size)
    preds = predict(model, [tta, memo], x)  # list order does not matter: adaptation is outermost

    augment = ttc.RandomAugment(seed=3)
    for pred, xb in zip(preds, x.split(8), strict=True):
        ref = copy.deepcopy(model.net)
        opt = SGD(ref.parameters())
        v = augment(xb.repeat(2, 1, 1, 1))
        mean = mixed_forward(ref, v, ALPHA).view(2, 8, -1).softmax(2).mean(0)
        (-(mean * mean.log()).sum(1).mean()).backward()
        opt.step()
        with torch.no_grad():
            if chunk_size == 1:
                expected = (mixed_forward(ref, xb, ALPHA) + mixed_forward(ref, xb.flip(-1), ALPHA)) / 2
            else:
                both = mixed_forward(ref, torch.cat([xb, xb.flip(-1)]), ALPHA)
                expected = (both[:8] + both[8:]) / 2
        torch.testing.assert_close(pred, expected, rtol=1e-5, atol=1e-5)
        plain = mixed_forward(ref, xb, ALPHA).detach()
        assert (pred - plain).abs().max() > 1e-4  # the merge matters


@pytest.mark.parametrize(("options", "name"), [(dict(views=0), "views"), (dict(alpha=1.5), "alpha")])
def test_bad_arguments(options, name):
    with pytest.raises(ValueError, match=name):
        ttc.MEMO(**options)


def test_restored_after_predict_with_default_trainer():
    memo = ttc.MEMO(optimizer=SGD, views=2)
    check_restored_after_predict(ConvNet(scale=5), memo, images(16))


@pytest.mark.parametrize("fail_call", [1, 2], ids=["views_forward", "prediction_forward"])
def test_restored_on_an_exception_in_the_second_batch(fail_call):
    memo = ttc.MEMO(optimizer=SGD, views=2, episodic=False)
    check_restored_on_exception(ConvNet(scale=5), memo, images(24), fail_call)


def test_marginal_entropy_over_deterministic_tta_views_matches_the_written_out_update():
    model, reference = ConvNet(), ConvNet()
    x = images(n=8)
    callback = ttc.MEMO(optimizer=functools.partial(torch.optim.SGD, lr=0.1), transforms="hflip", alpha=0.0)
    out = torch.cat(trainer([callback]).predict(model, loader(x)))
    net = batch_stats(reference.net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    logits = torch.stack([net(x), net(x.flip(-1))])
    p = logits.softmax(2).mean(0)
    (-(p * p.log()).sum(1).mean()).backward()
    optimizer.step()
    with torch.no_grad():
        torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-5)
