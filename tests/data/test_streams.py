"""Shift streams: segment order, reset flags, labels following their images, mixed shuffling and assignment,
validation before any work."""

import pytest
import torch
from digits import digits

import ttc_lightning.data.streams as streams
from ttc_lightning.data import CORRUPTIONS, Shift, corrupt, stream

NAMES = ("gaussian_noise", "contrast", "fog")
# Corruptions whose output for a sample depends on that sample only (no random draws).
PER_SAMPLE = ("contrast", "brightness", "pixelate", "jpeg_compression")


@pytest.fixture(scope="module")
def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    _, _, images, labels = digits()
    return images[:40], labels[:40]


def keys(shifts: list[Shift]) -> list[tuple[str, int, bool]]:
    return [(shift.name, shift.severity, shift.reset) for shift in shifts]


def test_reset_one_segment_per_corruption_and_severity_each_from_the_source(test_set):
    images, labels = test_set
    shifts = stream(images, labels, NAMES, severities=(3, 5), mode="reset", seed=4)
    assert keys(shifts) == [(name, severity, True) for name in NAMES for severity in (3, 5)]
    for shift in shifts:
        assert torch.equal(shift.images, corrupt(images, shift.name, shift.severity, seed=4))
        assert torch.equal(shift.labels, labels)


def test_default_stream_is_every_corruption_at_severity_5(test_set):
    images, labels = test_set
    shifts = stream(images[:4], labels[:4])
    assert keys(shifts) == [(name, 5, True) for name in CORRUPTIONS]


def test_continual_has_the_reset_segments_and_one_reset(test_set):
    images, labels = test_set
    reset = stream(images, labels, NAMES, severities=(5, 2), mode="reset")
    continual = stream(images, labels, NAMES, severities=(5, 2), mode="continual")
    assert keys(continual) == [(name, severity, index == 0) for index, (name, severity, _) in enumerate(keys(reset))]
    for a, b in zip(reset, continual, strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("severities", [(5,), (1, 2)])
def test_gradual_ramps_every_corruption_up_and_down_whatever_the_severities(test_set, severities):
    images, labels = test_set
    shifts = stream(images, labels, NAMES[:2], severities=severities, mode="gradual", seed=1)
    ramp = [1, 2, 3, 4, 5, 4, 3, 2, 1]
    assert keys(shifts) == [
        (name, severity, name == NAMES[0] and i == 0) for name in NAMES[:2] for i, severity in enumerate(ramp)
    ]
    for shift in shifts:
        assert torch.equal(shift.images, corrupt(images, shift.name, shift.severity, seed=1))
        assert torch.equal(shift.labels, labels)


def test_gradual_still_validates_severities(test_set):
    with pytest.raises(ValueError, match="`severities`=7"):
        stream(*test_set, NAMES, severities=(7,), mode="gradual")


def test_mixed_shuffles_and_gives_each_sample_one_corruption(test_set):
    images = test_set[0]
    ids = torch.arange(len(images))  # labels that name the clean image, to check alignment
    [shift] = stream(images, ids, PER_SAMPLE, severities=(4,), mode="mixed", seed=3)
    assert (shift.name, shift.severity, shift.reset) == ("mixed", 4, True)
    assert sorted(shift.labels.tolist()) == ids.tolist()  # a permutation of the test set
    assert not torch.equal(shift.labels, ids)  # shuffled
    candidates = {name: corrupt(images, name, 4) for name in PER_SAMPLE}  # per-sample: same as in any batch
    chosen = []
    for image, index in zip(shift.images, shift.labels, strict=True):
        matches = [name for name in PER_SAMPLE if torch.allclose(image, candidates[name][index], atol=1e-6)]
        assert len(matches) >= 1, int(index)  # the image is its own clean image under one of the corruptions
        chosen.append(matches[0] if len(matches) == 1 else None)
    counts = [chosen.count(name) for name in PER_SAMPLE]
    assert chosen.count(None) <= 2 and min(counts) >= 40 // 4 - 3, counts  # shares as equal as possible
    periodic = [PER_SAMPLE[i % 4] for i in range(len(chosen))]
    assert chosen != periodic and len(set(chosen[:8]) - {None}) > 1  # assigned at random, mixed within a batch


def test_mixed_is_deterministic_under_its_seed(test_set):
    images, labels = test_set
    a = stream(images, labels, NAMES, mode="mixed", seed=5)[0]
    b = stream(images, labels, NAMES, mode="mixed", seed=5)[0]
    c = stream(images, labels, NAMES, mode="mixed", seed=6)[0]
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"mode": "episodic"},
            r"`mode`='episodic' is not supported; allowed: 'reset', 'continual', 'gradual', 'mixed'",
        ),
        ({"mode": "mixed", "severities": (3, 5)}, r"`severities`=\(3, 5\) must hold exactly one severity"),
        ({"severities": (0,)}, r"`severities`=0 is not supported; allowed: integers 1 to 5"),
        ({"severities": ()}, r"`severities`=\(\) must be a non-empty sequence"),
        ({"severities": 5}, r"`severities`=5 must be a non-empty sequence"),
        ({"corruptions": "fog"}, r"`corruptions`='fog' must be a non-empty sequence of names"),
        ({"corruptions": ()}, r"`corruptions`=\(\) must be a non-empty sequence"),
        ({"corruptions": ("fog", "rain")}, r"`corruptions`='rain' is not supported; allowed: 'gaussian_noise'"),
        ({"seed": -2}, r"`seed`=-2 must be an integer >= 0"),
        ({"labels": torch.zeros(3)}, r"`labels` must be a tensor with one entry per image \(40\); got \(3,\)"),
        ({"labels": [0] * 40}, r"`labels` must be a tensor .* got list"),
        ({"images": torch.rand(40, 8, 8)}, r"`images` must have shape \(B, C, H, W\)"),
        ({"images": torch.full((40, 1, 8, 8), 2.0)}, r"`images` must lie in \[0, 1\]"),
    ],
)
def test_bad_arguments_are_named_before_any_work(test_set, monkeypatch, kwargs, match):
    def fail(*args, **kwargs):
        raise AssertionError("corrupt was called before validation finished")

    monkeypatch.setattr(streams, "corrupt", fail)
    images, labels = test_set
    arguments = {"images": images, "labels": labels, **kwargs}
    with pytest.raises(ValueError, match=match):
        stream(**arguments)
