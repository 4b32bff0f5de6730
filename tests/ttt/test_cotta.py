"""CoTTA against the authors' forward_and_adapt written out in the test: anchor confidence, EMA teacher,
augmentation-averaged targets, student cross entropy, teacher update and stochastic restore."""

import copy
import functools

import pytest
import torch
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

ADAM = functools.partial(torch.optim.Adam, lr=1e-2)


def cotta_reference(net, batches, optimizer, threshold, views, seed, ema=0.999, restore_prob=0.01):
    """The authors' CoTTA.forward_and_adapt with BatchNorm on batch statistics everywhere (student, teacher, anchor).

    The teacher's views come from RandomAugment(seed) (drawn only when the anchor's mean confidence is below
    ``threshold``); the restore masks, one uniform tensor per parameter in order, from a generator seeded with
    ``seed`` (the same on every rank). Returns per batch the teacher's target (the prediction), the student's and
    the teacher's parameters after the batch, the restored element count, and the anchor confidences."""
    student = batch_stats(net)
    params = list(student.parameters())
    opt = optimizer(params)
    teacher, anchor = copy.deepcopy(student), copy.deepcopy(student)
    source = [p.detach().clone() for p in params]
    augment = ttc.RandomAugment(seed=seed)
    masks = torch.Generator().manual_seed(seed)
    targets, students, teachers, restored, confidences = [], [], [], [], []
    for x in batches:
        with torch.no_grad():
            confidence = anchor(x).softmax(1).max(1)[0].mean(0).item()
            standard = teacher(x)
            if confidence < threshold:
                target = torch.stack([teacher(v) for v in augment(x.repeat(views, 1, 1, 1)).chunk(views)]).mean(0)
            else:
                target = standard
        out = student(x)
        loss = (-(target.softmax(1) * out.log_softmax(1)).sum(1)).mean(0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        count = 0
        with torch.no_grad():
            for t, p in zip(teacher.parameters(), student.parameters(), strict=True):
                t.data[:] = ema * t[:].data[:] + (1 - ema) * p[:].data[:]
            for p, s in zip(params, source, strict=True):
                mask = (torch.rand(p.shape, generator=masks) < restore_prob).float()
                p.data = s * mask + p * (1.0 - mask)
                count += int(mask.sum())
        targets.append(target)
        students.append([p.detach().clone() for p in params])
        teachers.append([p.detach().clone() for p in teacher.parameters()])
        restored.append(count)
        confidences.append(confidence)
    return targets, students, teachers, restored, confidences


def run(model, cotta, x, callbacks=()):
    recorder = Recorder(cotta)
    preds = trainer([cotta, recorder, *callbacks]).predict(model, loader(x))
    return preds, recorder


def close(got, want, rtol=1e-5, atol=1e-5):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("threshold", [0.0, 1.0], ids=["never_augment", "always_augment"])
def test_parity_with_the_authors_loop(threshold):
    x = images(24, seed=4)
    model = ConvNet(scale=5, conv_bias=False)
    options = dict(ema=0.9, restore_prob=0.1)
    views = {} if threshold == 0 else {"views": 3}  # the teacher never augments at threshold 0: views is refused
    cotta = ttc.CoTTA(optimizer=ADAM, anchor_threshold=threshold, augment=ttc.RandomAugment(seed=5), **views, **options)
    preds, rec = run(model, cotta, x)
    targets, students, teachers, restored, confidences = cotta_reference(
        model.net, list(x.split(8)), ADAM, threshold, 3, 5, **options
    )
    assert all(0 < c < 1 for c in confidences)  # so the threshold decides as intended
    assert sum(restored) > 0  # the stochastic restore acted
    for pred, target in zip(preds, targets, strict=True):
        torch.testing.assert_close(pred, target, rtol=1e-5, atol=1e-5)
    for got, want in zip(rec.params, students, strict=True):
        close(got, want)
    close(cotta.teacher.values, teachers[-1])  # the teacher's EMA values after the stream
    assert cotta.anchor_confidence == pytest.approx(confidences[-1], rel=1e-5)
    assert cotta.updates == 3


def test_threshold_between_batches_augments_only_the_unsure_ones():
    """The anchor is the source model, so each batch's confidence is known beforehand: a threshold between them
    makes the stream use both branches."""
    x = images(24, seed=4)
    model = ConvNet(scale=5, conv_bias=False)
    with torch.no_grad():
        confidences = [batch_stats(model.net)(b).softmax(1).amax(1).mean().item() for b in x.split(8)]
    low, high = sorted(confidences)[:2]
    assert high - low > 1e-3
    threshold = (low + high) / 2
    cotta = ttc.CoTTA(optimizer=ADAM, anchor_threshold=threshold, views=2, augment=ttc.RandomAugment(seed=2))
    preds, _ = run(model, cotta, x)
    targets, *_, seen = cotta_reference(model.net, list(x.split(8)), ADAM, threshold, 2, 2)
    assert seen == pytest.approx(confidences, rel=1e-6)
    for pred, target in zip(preds, targets, strict=True):
        torch.testing.assert_close(pred, target, rtol=1e-5, atol=1e-5)
    never, *_ = cotta_reference(model.net, list(x.split(8)), ADAM, 0.0, 2, 2)
    always, *_ = cotta_reference(model.net, list(x.split(8)), ADAM, 1.0, 2, 2)
    # The first batch is the same for every threshold up to its own branch.
    first = always[0] if confidences[0] < threshold else never[0]
    torch.testing.assert_close(preds[0], first, rtol=1e-5, atol=1e-5)
    assert any((p - n).abs().max() > 1e-4 for p, n in zip(preds, never, strict=True))
    assert any((p - a).abs().max() > 1e-4 for p, a in zip(preds, always, strict=True))


def test_no_restore_with_restore_prob_zero():
    x = images(24, seed=4)
    model = ConvNet(scale=5, conv_bias=False)
    cotta = ttc.CoTTA(optimizer=ADAM, restore_prob=0.0, anchor_threshold=0.0)
    _, rec = run(model, cotta, x)
    _, students, _, restored, _ = cotta_reference(model.net, list(x.split(8)), ADAM, 0.0, 2, 0, restore_prob=0)
    assert restored == [0, 0, 0]
    # A plain Adam student on the teacher's targets.
    for got, want in zip(rec.params, students, strict=True):
        close(got, want)
    source = list(model.net.parameters())
    assert all((p != s).all() for p, s in zip(rec.params[-1], source, strict=True) if p.numel() > 1)


def test_full_restore_with_restore_prob_one():
    x = images(16, seed=4)
    model = ConvNet(scale=5, conv_bias=False)
    cotta = ttc.CoTTA(
        optimizer=ADAM, restore_prob=1.0, ema=0.5, anchor_threshold=0.0, persistence=ttc.Persistence(keep_adapted=True)
    )
    _, rec = run(model, cotta, x)
    source = [p.detach().clone() for p in ConvNet(scale=5, conv_bias=False).net.parameters()]
    for params in rec.params:
        for p, s in zip(params, source, strict=True):
            assert torch.equal(p, s)  # the student is the source after every batch
    _, _, teachers, _, _ = cotta_reference(model.net, list(x.split(8)), ADAM, 0.0, 2, 0, ema=0.5, restore_prob=1.0)
    close(cotta.teacher.values, teachers[-1])
    assert any(not torch.equal(t, s) for t, s in zip(cotta.teacher.values, source, strict=True))


def test_teacher_frozen_with_ema_one():
    """ema = 1: the teacher stays the source model, so with threshold 0 every prediction is the source model on
    batch statistics, however much the student moves (allowed only when the student is kept)."""
    x = images(24, seed=4)
    model = ConvNet(scale=5, conv_bias=False)
    with pytest.raises(ValueError, match=r"`ema`=1.0 leaves the `optimizer` without effect"):
        ttc.CoTTA(ema=1.0)  # the student's training would be thrown away
    adam = functools.partial(torch.optim.Adam, lr=0.1)
    cotta = ttc.CoTTA(optimizer=adam, ema=1.0, anchor_threshold=0.0, persistence=ttc.Persistence(keep_adapted=True))
    source = [p.detach().clone() for p in model.net.parameters()]
    reference = copy.deepcopy(model.net)
    preds, rec = run(model, cotta, x)
    for t, s in zip(cotta.teacher.values, source, strict=True):
        assert torch.equal(t, s)
    with torch.no_grad():
        expected = [batch_stats(reference)(b) for b in x.split(8)]
    for pred, out in zip(preds, expected, strict=True):
        torch.testing.assert_close(pred, out, rtol=1e-5, atol=1e-6)
    assert any((p - s).abs().max() > 1e-3 for p, s in zip(rec.params[-1], source, strict=True))
    close(list(model.net.parameters()), rec.params[-1], rtol=0, atol=0)  # the kept student


def test_teacher_follows_the_student_with_ema_zero():
    """ema = 0: the teacher is the student right after its step (before the restore)."""
    x = images(16, seed=4)
    model = ConvNet(scale=5, conv_bias=False)
    cotta = ttc.CoTTA(optimizer=ADAM, ema=0.0, restore_prob=0.0, anchor_threshold=0.0)
    _, rec = run(model, cotta, x)
    close(cotta.teacher.values, rec.params[-1], rtol=0, atol=0)


def test_default_settings_match_the_reference():
    """Defaults: Adam lr 1e-3, ema 0.999, restore 0.01, threshold 0.92, 32 views of RandomAugment(seed 0)."""
    x = images(8, seed=4)
    model = ConvNet(scale=5, conv_bias=False)
    cotta = ttc.CoTTA()
    preds, _ = run(model, cotta, x)
    targets, _, teachers, _, confidences = cotta_reference(
        model.net, [x], functools.partial(torch.optim.Adam, lr=1e-3), 0.92, 32, 0
    )
    assert confidences[0] < 0.92  # the augmented branch
    torch.testing.assert_close(preds[0], targets[0], rtol=1e-5, atol=1e-5)
    close(cotta.teacher.values, teachers[0])


@pytest.mark.parametrize("chunk_size", [1, None], ids=["views_one_by_one", "views_stacked"])
def test_composed_with_tta_merges_the_teacher(chunk_size):
    """Composed with h-flip TTA the loss is CoTTA's own; the prediction is the merged forward with the teacher's
    weights (after the batch's teacher update), not the student's."""
    x = images(16, seed=4)
    model = ConvNet(scale=5, conv_bias=False)
    cotta = ttc.CoTTA(optimizer=ADAM, ema=0.5, restore_prob=0.1, anchor_threshold=1.0, views=2)
    tta = ttc.TestTimeAugmentation(transforms="hflip", chunk_size=chunk_size)
    preds, rec = run(model, cotta, x, callbacks=[tta])
    _, students, teachers, _, _ = cotta_reference(
        model.net, list(x.split(8)), ADAM, 1.0, 2, 0, ema=0.5, restore_prob=0.1
    )
    for pred, xb, teacher, student in zip(preds, x.split(8), teachers, students, strict=True):
        net = batch_stats(model.net)
        with torch.no_grad():
            for p, t in zip(net.parameters(), teacher, strict=True):
                p.copy_(t)

            def merged(net=net, xb=xb):
                if chunk_size == 1:
                    return (net(xb) + net(xb.flip(-1))) / 2
                both = net(torch.cat([xb, xb.flip(-1)]))
                return (both[:8] + both[8:]) / 2

            expected = merged()
            for p, s in zip(net.parameters(), student, strict=True):
                p.copy_(s)
            by_student = merged()
        torch.testing.assert_close(pred, expected, rtol=1e-5, atol=1e-5)
        assert (pred - by_student).abs().max() > 1e-4
    for got, want in zip(rec.params, students, strict=True):
        close(got, want)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        (dict(ema=1.5), "ema"),
        (dict(restore_prob=-0.1), "restore_prob"),
        (dict(anchor_threshold=2.0), "anchor_threshold"),
        (dict(views=0), "views"),
    ],
)
def test_bad_arguments(options, name):
    with pytest.raises(ValueError, match=name):
        ttc.CoTTA(**options)


def test_restored_after_predict_with_default_trainer():
    cotta = ttc.CoTTA(optimizer=ADAM, anchor_threshold=1.0, views=2, restore_prob=0.2)
    check_restored_after_predict(ConvNet(scale=5, conv_bias=False), cotta, images(16))


@pytest.mark.parametrize("fail_call", [1, 2, 5], ids=["anchor", "teacher", "student"])
def test_restored_on_an_exception_in_the_second_batch(fail_call):
    """Calls per batch: anchor (source weights swapped in), teacher (teacher weights swapped in), 2 augmented
    teacher views, student."""
    cotta = ttc.CoTTA(optimizer=ADAM, anchor_threshold=1.0, views=2, restore_prob=0.2)
    check_restored_on_exception(ConvNet(scale=5, conv_bias=False), cotta, images(24), fail_call)
