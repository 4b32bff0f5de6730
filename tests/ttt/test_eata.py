"""EATA against the authors' forward_and_adapt_eata / update_model_probs / Fisher estimate written out in the test."""

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
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
    state,
    trainer,
)

import ttc_lightning as ttc

SGD = functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9)


def eata_reference(
    net, params, batches, optimizer, e_margin=0.4, d_margin=0.05, fisher=None, alpha=0.0, episodic=False
):
    """EATA's forward_and_adapt_eata and update_model_probs (the authors' code), margins as fractions of ln C.

    ``net`` is already configured (a copy); ``params`` its adapted parameters. Returns per batch the outputs, the
    kept masks and the parameters after the batch, and the backward passes taken. Asserts that no decision lies
    within float noise of a threshold, so that the library and the reference cannot disagree by rounding."""
    opt = optimizer(params)
    anchor = [p.detach().clone() for p in params]
    start = ([p.detach().clone() for p in params], {k: v for k, v in opt.state_dict().items()})
    probs, outputs, kept_masks, history, backwards = None, [], [], [], 0
    for x in batches:
        if episodic:
            with torch.no_grad():
                for p, p0 in zip(params, start[0], strict=True):
                    p.copy_(p0)
            opt = optimizer(params)
            probs = None
        out = net(x)
        margin = e_margin * math.log(out.shape[1])
        ent = entropy(out)
        assert ((ent.detach() - margin).abs() > 1e-4).all(), "constructed entropy too close to the threshold"
        ids1 = torch.where(ent < margin)[0]
        ents = ent[ids1]
        kept = ids1
        if probs is not None:
            cos = F.cosine_similarity(probs.unsqueeze(0), out[ids1].softmax(1), dim=1)
            assert ((cos.abs() - d_margin).abs() > 1e-4).all(), "constructed similarity too close to the threshold"
            ids2 = torch.where(cos.abs() < d_margin)[0]
            ents = ents[ids2]
            kept = ids1[ids2]
        new = out[kept].softmax(1).detach()
        if new.shape[0]:
            probs = new.mean(0) if probs is None else 0.9 * probs + 0.1 * new.mean(0)
        coeff = 1 / torch.exp(ents.detach() - margin)
        loss = (ents * coeff).mean(0)
        if fisher is not None:
            loss = loss + sum(
                alpha * (f * (p - p0) ** 2).sum() for f, p, p0 in zip(fisher, params, anchor, strict=True)
            )
        if kept.numel():
            loss.backward()
            opt.step()
            backwards += 1
        opt.zero_grad()
        mask = torch.zeros(x.shape[0], dtype=torch.bool)
        mask[kept] = True
        outputs.append(out.detach())
        kept_masks.append(mask)
        history.append([p.detach().clone() for p in params])
    return outputs, kept_masks, history, backwards


def fisher_reference(net, params, batches):
    """The authors' Fisher: squared gradients of the cross entropy with the model's own argmax, summed over the
    batches, divided by their number."""
    fishers = [torch.zeros_like(p) for p in params]
    for x in batches:
        out = net(x)
        loss = nn.CrossEntropyLoss()(out, out.max(1)[1])
        loss.backward()
        for f, p in zip(fishers, params, strict=True):
            f += p.grad.detach() ** 2
            p.grad = None
    return [f / len(batches) for f in fishers]


def row(c: int, value: float, classes: int = 4) -> torch.Tensor:
    v = torch.zeros(classes)
    v[c] = value
    return v


def constructed_batches() -> list[torch.Tensor]:
    """Logit rows for :class:`LogitNet` (4 classes; thresholds 0.4 ln 4 = 0.55 and cosine 0.05):

    batch 0: three confident class-0 rows (kept: no average yet) and three flat rows (entropy above 0.4 ln 4);
    batch 1: confident rows of classes 2, 3, 2 (kept: nearly orthogonal to the class-0 average), two confident
    class-0 rows (redundant) and a uniform row; batch 2: only flat rows (nothing kept: no backward pass);
    batch 3: a mix again, decided by the average that batch 2 must have left alone."""
    b0 = torch.stack([row(0, 4), row(0, 5), row(0, 0.5), torch.zeros(4), row(0, 4.5), row(1, 1.0)])
    b1 = torch.stack([row(2, 5), row(0, 5), row(3, 5), torch.zeros(4), row(2, 6), row(0, 4.5)])
    b2 = torch.stack([torch.zeros(4), row(0, 0.5), row(2, 0.8), row(3, 1.0), row(1, 0.3), row(0, -0.5)])
    b3 = torch.stack([row(0, 6), row(1, 6), row(2, 0.5), row(1, 4), row(2, 6), torch.zeros(4)])
    return [b0, b1, b2, b3]


EXPECTED_KEPT = [
    [True, True, False, False, True, False],
    [True, False, True, False, True, False],
    [False] * 6,
]


def logit_reference(batches, optimizer=SGD, **options):
    net = LogitNet()
    return eata_reference(net.head, list(net.head.parameters()), batches, optimizer, **options)


def run(model, callback, x, batch_size=6, names=None):
    recorder = Recorder(callback, names)
    preds = trainer([callback, recorder]).predict(model, loader(x, batch_size))
    return preds, recorder


def test_filters_on_constructed_batches_match_the_authors_loop():
    batches = constructed_batches()
    outputs, kept, history, backwards = logit_reference(batches)
    assert [k.tolist() for k in kept[:3]] == EXPECTED_KEPT  # the construction does what its docstring says
    eata = ttc.EATA(optimizer=SGD, params="all")
    preds, rec = run(LogitNet(), eata, torch.cat(batches))

    for pred, out in zip(preds, outputs, strict=True):
        torch.testing.assert_close(pred, out, rtol=1e-5, atol=1e-6)
    for got, want in zip(rec.params, history, strict=True):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert rec.column("kept_fraction") == pytest.approx([k.float().mean().item() for k in kept])
    assert rec.column("kept_fraction")[:3] == pytest.approx([0.5, 0.5, 0.0])
    # A batch with no kept sample takes no backward pass and no update.
    assert rec.column("backwards") == [1, 2, 2, 3] and backwards == 3
    assert rec.column("updates") == [1, 2, 2, 3]
    assert math.isnan(rec.figures[2]["last_loss"])
    assert eata.skipped == 0 and eata.resets == 0
    assert not torch.equal(history[-1][0], torch.eye(4))  # the parameters moved


def test_predictions_come_before_the_update_and_the_average_uses_kept_samples_only():
    """The moving average of kept probabilities, checked directly on the objective after a one-batch run."""
    batches = constructed_batches()[:2]
    eata = ttc.EATA(optimizer=SGD, params="all")
    preds, _ = run(LogitNet(), eata, torch.cat(batches))
    torch.testing.assert_close(preds[0], batches[0])  # output at the source parameters: the input itself
    outputs, kept, _, _ = logit_reference(batches)
    first = outputs[0][kept[0]].softmax(1).mean(0)
    second = outputs[1][kept[1]].softmax(1).mean(0)
    torch.testing.assert_close(eata.eata.probs_average, 0.9 * first + 0.1 * second, rtol=1e-5, atol=1e-7)


def test_batchnorm_model_parity_with_the_authors_loop():
    """A conv net with BatchNorm (batch statistics, affine parameters adapted), SGD with momentum, loose filters so
    that some batches update and the redundancy filter acts."""
    x = images(32, seed=6)
    model = ConvNet(scale=15)
    opt = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    eata = ttc.EATA(optimizer=opt, e_margin=0.9, d_margin=0.98)
    preds, rec = run(model, eata, x, batch_size=8, names=["net.1.weight", "net.1.bias"])
    net = batch_stats(model.net)
    outputs, kept, history, backwards = eata_reference(
        net, [net[1].weight, net[1].bias], list(x.split(8)), opt, e_margin=0.9, d_margin=0.98
    )
    assert 0 < sum(k.sum().item() for k in kept) < 32  # both filters matter here
    for pred, out in zip(preds, outputs, strict=True):
        torch.testing.assert_close(pred, out, rtol=1e-5, atol=1e-5)
    for got, want in zip(rec.params, history, strict=True):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert eata.backwards == backwards
    assert rec.column("kept_fraction") == pytest.approx([k.float().mean().item() for k in kept])


def entropy_row(classes: int, target: float) -> torch.Tensor:
    """A logit row ``[a, 0, ..., 0]`` whose entropy is ``target`` (bisection on ``a``)."""
    low, high = 0.0, 50.0
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if entropy(row(0, mid, classes)[None]).item() > target else (low, mid)
    return row(0, (low + high) / 2, classes)


@pytest.mark.parametrize(("classes", "kept"), [(4, 0.25), (10, 0.75)])
def test_entropy_threshold_scales_with_log_classes(classes, kept):
    """Entropies 0.3, 0.7, 0.7 and 1.0 nats: under 0.4 ln 4 = 0.55 only the first is kept; under 0.4 ln 10 = 0.92
    three are. A hard-coded ln 1000 (2.76) would keep all four in both cases."""
    x = torch.stack([entropy_row(classes, e) for e in (0.3, 0.7, 0.7, 1.0)])
    torch.testing.assert_close(entropy(x), torch.tensor([0.3, 0.7, 0.7, 1.0]), rtol=0, atol=1e-5)
    eata = ttc.EATA(optimizer=SGD, params="all")
    run(LogitNet(classes), eata, x, batch_size=4)
    assert eata.kept_fraction == kept
    assert eata.backwards == 1


def test_custom_margins_are_fractions_of_log_classes():
    x = torch.stack([entropy_row(4, e) for e in (0.2, 0.3, 0.5, 0.9)])
    eata = ttc.EATA(optimizer=SGD, params="all", e_margin=0.25)  # 0.25 ln 4 = 0.35
    run(LogitNet(), eata, x, batch_size=4)
    assert eata.kept_fraction == 0.5


def test_episodic_reset_clears_the_moving_average():
    """Episodic: the model, the optimizer and the moving average start afresh on every batch, so only the entropy
    filter acts (batch 1 keeps its two confident class-0 rows too)."""
    batches = constructed_batches()
    # keep_adapted: episodic with one step predicts with the source model only, refused unless the last adaptation
    # is kept
    eata = ttc.EATA(optimizer=SGD, params="all", episodic=True, persistence=ttc.Persistence(keep_adapted=True))
    preds, rec = run(LogitNet(), eata, torch.cat(batches))
    outputs, kept, history, _ = logit_reference(batches, episodic=True)
    assert kept[1].tolist() == [True, True, True, False, True, True]
    for pred, out in zip(preds, outputs, strict=True):
        torch.testing.assert_close(pred, out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(preds), torch.cat(batches))  # always the source model
    for got, want in zip(rec.params, history, strict=True):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert rec.column("kept_fraction") == pytest.approx([0.5, 5 / 6, 0.0, 4 / 6])
    assert rec.column("resets") == [0, 1, 2, 3]
    # After the last batch the average holds that batch's kept probabilities only.
    torch.testing.assert_close(eata.eata.probs_average, outputs[3][kept[3]].softmax(1).mean(0))


def test_manual_reset_clears_the_moving_average():
    batches = constructed_batches()[:2]
    eata = ttc.EATA(optimizer=SGD, params="all")

    class ResetBeforeSecond(Recorder):
        def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 1:
                self.callback.reset()

    recorder = ResetBeforeSecond(eata)
    trainer([eata, recorder]).predict(LogitNet(), loader(torch.cat(batches), 6))
    assert eata.resets == 1
    assert recorder.column("kept_fraction") == pytest.approx([0.5, 5 / 6])


def conv_setup(n_fisher_batches=2):
    model = ConvNet(scale=15)
    fisher_x = images(8 * n_fisher_batches, seed=11)
    net = batch_stats(model.net)
    params = [net[1].weight, net[1].bias]
    return model, fisher_x, net, params


@pytest.mark.parametrize("form", ["tensors", "tuples", "dataloader"])
def test_fisher_is_the_mean_squared_pseudo_label_gradient(form):
    model, fisher_x, net, params = conv_setup(3)
    data = {
        "tensors": list(fisher_x.split(8)),
        "tuples": [(b, torch.zeros(len(b))) for b in fisher_x.split(8)],
        "dataloader": loader(fisher_x, 8),
    }[form]
    eata = ttc.EATA(optimizer=SGD, e_margin=0.9, d_margin=0.98, fisher_data=data)
    run(model, eata, images(8), batch_size=8)
    expected = fisher_reference(net, params, list(fisher_x.split(8)))
    assert len(eata.fisher) == 2
    for got, want in zip(eata.fisher, expected, strict=True):
        assert (want > 0).any()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_fisher_penalty_enters_the_update():
    """Four batches with SGD+momentum: from the second update on, theta != theta_0 and the penalty's gradient
    2 alpha F (theta - theta_0) changes the updates; the library follows the reference with the penalty, which
    differs clearly from the reference without it."""
    model, fisher_x, net, params = conv_setup(2)
    x = images(32, seed=6)
    opt = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    alpha = 10.0
    options = dict(e_margin=0.9, d_margin=0.98)
    eata = ttc.EATA(optimizer=opt, fisher_data=list(fisher_x.split(8)), fisher_alpha=alpha, **options)
    preds, rec = run(model, eata, x, batch_size=8, names=["net.1.weight", "net.1.bias"])

    fisher = fisher_reference(net, params, list(fisher_x.split(8)))
    outputs, _, history, backwards = eata_reference(
        net, params, list(x.split(8)), opt, fisher=fisher, alpha=alpha, **options
    )
    plain_net = batch_stats(model.net)
    _, _, plain_history, _ = eata_reference(
        plain_net, [plain_net[1].weight, plain_net[1].bias], list(x.split(8)), opt, **options
    )
    assert backwards >= 3
    for pred, out in zip(preds, outputs, strict=True):
        torch.testing.assert_close(pred, out, rtol=1e-5, atol=1e-5)
    for got, want in zip(rec.params, history, strict=True):
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    gap = max((a - b).abs().max().item() for a, b in zip(history[-1], plain_history[-1], strict=True))
    assert gap > 0.01  # the penalty matters at this alpha


def test_fisher_alpha_zero_refuses_fisher_data_and_is_plain_eata():
    """With fisher_alpha=0 the Fisher estimate would go unused: fisher_data is refused, and the rest is plain EATA."""
    model, fisher_x, net, params = conv_setup(1)
    x = images(16, seed=5)
    with pytest.raises(ValueError, match=r"`fisher_data` has no effect: .* fisher_alpha=0"):
        ttc.EATA(optimizer=SGD, fisher_data=[fisher_x], fisher_alpha=0.0)
    eata = ttc.EATA(optimizer=SGD, e_margin=0.9, d_margin=0.98)
    preds, _ = run(model, eata, x, batch_size=8)
    outputs, *_ = eata_reference(net, params, list(x.split(8)), SGD, e_margin=0.9, d_margin=0.98)
    torch.testing.assert_close(torch.cat(preds), torch.cat(outputs), rtol=1e-5, atol=1e-5)


def test_fisher_data_without_batches_is_a_clear_error():
    with pytest.raises(ValueError, match="fisher_data"):
        trainer([ttc.EATA(optimizer=SGD, fisher_data=[])]).predict(ConvNet(), loader(images(8)))


def test_fisher_data_without_batches_leaves_the_model_untouched():
    """The error is raised while the strategies are being installed; the model must still come back as it was
    (no BatchNorm layer left normalising with batch statistics)."""
    model = ConvNet()
    model.eval()
    before = state(model)
    x = images(8)
    with torch.no_grad():
        expected = model.net(x)
    with pytest.raises(ValueError, match="fisher_data"):
        trainer([ttc.EATA(optimizer=SGD, fisher_data=iter(()))]).predict(model, loader(x))
    with torch.no_grad():
        torch.testing.assert_close(model.net(x), expected)
    assert state(model)["own_forward"] == before["own_forward"]


@pytest.mark.parametrize(
    ("options", "name"),
    [
        (dict(e_margin=0.0), "e_margin"),
        (dict(e_margin=-1.0), "e_margin"),
        (dict(d_margin=0.0), "d_margin"),
        (dict(d_margin=1.5), "d_margin"),
        (dict(fisher_alpha=-1.0), "fisher_alpha"),
    ],
)
def test_bad_arguments(options, name):
    with pytest.raises(ValueError, match=name):
        ttc.EATA(**options)


def test_restored_after_predict_with_default_trainer():
    eata = ttc.EATA(optimizer=SGD, e_margin=1.0, d_margin=1.0, fisher_data=[images(8, seed=9)])
    check_restored_after_predict(ConvNet(scale=15), eata, images(24))


def test_restored_on_an_exception_in_the_second_batch():
    eata = ttc.EATA(optimizer=SGD, e_margin=1.0, d_margin=1.0)
    check_restored_on_exception(ConvNet(scale=15), eata, images(24))
