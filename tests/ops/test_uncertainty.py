"""Uncertainty across views (std, entropy, mutual_info, agreement) against formulas on the full stack of views."""

import pytest
import torch
import ttach
from torch import nn
from view_tables import table_tta

import ttc_lightning as ttc
from ttc_lightning.ops.uncertainty import UNCERTAINTIES, UncertaintyAccumulator
from ttc_lightning.tta.augmenter import Augmenter

TOL = dict(rtol=1e-5, atol=1e-6)
CHUNKS = (1, 2, None)


def entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    return -(p * p.log()).sum(dim)


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.log() + (1 - p) * (1 - p).log())


def softmax_reference(stack: torch.Tensor, space: str, merged: torch.Tensor) -> dict:
    """The four measures from a (views, B, C, ...) stack of logits, class dim 2, and the merged output."""
    p = stack.softmax(2)
    values = {"raw": stack, "prob": p, "logprob": stack.log_softmax(2)}[space]
    p_mean = p.mean(0)
    return {
        "std": values.std(0, correction=0),
        "entropy": entropy(p_mean, 1),
        "mutual_info": entropy(p_mean, 1) - entropy(p, 2).mean(0),
        "agreement": (stack.argmax(2) == merged.argmax(1)).float().mean(0),
    }


def check_measures(out: dict, expected: dict, prediction: torch.Tensor) -> None:
    assert set(out) == {"prediction", *expected}
    torch.testing.assert_close(out["prediction"], prediction, **TOL)
    for name, value in expected.items():
        assert out[name].shape == value.shape, name
        torch.testing.assert_close(out[name], value, **TOL, msg=name)


@pytest.mark.parametrize(("merge", "space"), [("mean", "raw"), ("mean", "prob"), ("mean", "logprob"), ("vote", "prob")])
def test_classification_measures_match_formulas_for_every_chunk_size(merge, space):
    table = 2 * torch.randn(6, 4, 5, generator=torch.Generator().manual_seed(0))
    merged = {
        "raw": table.mean(0),
        "prob": table.softmax(2).mean(0).log(),
        "logprob": table.log_softmax(2).mean(0),
    }[space]
    if merge == "vote":
        votes = nn.functional.one_hot(table.argmax(2), 5).sum(0).float()
        merged = votes / 6 + table.softmax(2).mean(0) / 7
    expected = softmax_reference(table, space, merged)
    assert expected["mutual_info"].min() > 0 and expected["agreement"].min() < 1  # the views disagree
    for chunk_size in CHUNKS:
        out = table_tta(table, chunk_size, merge=merge, space=space, uncertainty=True)
        check_measures(out, expected, merged)
        assert out["entropy"].shape == (4,) and out["std"].shape == (4, 5)


def test_agreement_uses_the_merged_decision_not_the_identity_view():
    # three views say class 0 weakly, one says class 2 strongly: mean-prob merge picks 2, one view of four agrees
    rows = [[0.4, 0.35, 0.25]] * 3 + [[0.01, 0.01, 0.98]]
    table = torch.tensor(rows).log().unsqueeze(1)
    out = table_tta(table, None, merge="mean", space="prob", uncertainty="agreement")
    assert out["prediction"].argmax(1).item() == 2
    assert out["agreement"].item() == pytest.approx(0.25)
    out = table_tta(table, None, merge="vote", uncertainty="agreement")
    assert out["prediction"].argmax(1).item() == 0
    assert out["agreement"].item() == pytest.approx(0.75)


def segmenter() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)).eval()


def test_segmentation_measures_match_formulas_on_the_deaugmented_d4_stack():
    model, x = segmenter(), torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # ttach's transforms give the de-augmented views independently of ours
        stack = torch.stack([t.deaugment_mask(model(t.augment_image(x))) for t in ttach.aliases.d4_transform()])
        merged = stack.softmax(2).mean(0).log()
        expected = softmax_reference(stack, "prob", merged)
        for chunk_size in CHUNKS:
            wrapper = ttc.TTAWrapper(
                model, transforms="d4", task="segmentation", space="prob", uncertainty=True, chunk_size=chunk_size
            )
            out = wrapper(x)
            check_measures(out, expected, merged)
            for name in ("entropy", "mutual_info", "agreement"):
                assert out[name].shape == (2, 6, 8)
            assert out["std"].shape == (2, 4, 6, 8)


@pytest.mark.parametrize("space", ["raw", "prob"])
def test_sigmoid_measures_are_per_label(space):
    table = 2 * torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(2))
    p = table.sigmoid()
    merged = table.mean(0) if space == "raw" else torch.logit(p.mean(0))
    expected = {
        "std": (table if space == "raw" else p).std(0, correction=0),
        "entropy": binary_entropy(p.mean(0)),
        "mutual_info": binary_entropy(p.mean(0)) - binary_entropy(p).mean(0),
        "agreement": ((table > 0) == (merged > 0)).float().mean(0),
    }
    assert expected["agreement"].min() < 1
    for chunk_size in CHUNKS:
        out = table_tta(table, chunk_size, space=space, activation="sigmoid", uncertainty=True)
        check_measures(out, expected, merged)
        assert all(value.shape == (3, 4) for value in out.values())


def test_std_works_for_keypoints_and_class_measures_are_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d((2, 3)), nn.Flatten(), nn.Linear(24, 6))
    height, width = 6, 8

    def keypoints(x):  # (B, 3, 2) pixel coordinates
        return net(x).view(-1, 3, 2).sigmoid() * torch.tensor([float(width), float(height)])

    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        views = []
        for h in (False, True):
            for v in (False, True):
                image = x.flip(-1) if h else x
                points = keypoints(image.flip(-2) if v else image).clone()
                if v:
                    points[..., 1] = height - points[..., 1]
                if h:
                    points[..., 0] = width - points[..., 0]
                views.append(points)
        stack = torch.stack(views)
        for chunk_size in CHUNKS:
            augmenter = Augmenter("flip", task="keypoints", uncertainty=True, chunk_size=chunk_size)
            merged, extras = augmenter(keypoints, x)
            assert set(extras) == {"std"}
            torch.testing.assert_close(merged, stack.mean(0), **TOL)
            torch.testing.assert_close(extras["std"], stack.std(0, correction=0), **TOL)
    for name in ("entropy", "mutual_info", "agreement"):
        for task in ("keypoints", "boxes"):
            with pytest.raises(ValueError, match=f"`uncertainty`='{name}'.*task='{task}'"):
                Augmenter("flip", task=task, uncertainty=name)
    with pytest.raises(ValueError, match="`uncertainty`='variance'"):
        Augmenter("flip", uncertainty="variance")


def test_requested_subset_only():
    table = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(4))
    out = table_tta(table, None, uncertainty=["entropy", "agreement"])
    assert set(out) == {"prediction", "entropy", "agreement"}
    assert torch.is_tensor(table_tta(table, None, uncertainty=False))


def test_class_measures_on_a_one_dimensional_output_raise_a_clear_error():
    # A (B,) output has no class dimension: raw merges accept it, entropy/agreement need classes.
    def forward(x):
        return x.mean((1, 2, 3))

    x = torch.randn(3, 1, 4, 4)
    merged, extras = Augmenter("hflip", uncertainty="std")(forward, x)
    assert merged.shape == extras["std"].shape == (3,)
    for name in ("entropy", "mutual_info", "agreement"):
        with pytest.raises(ValueError, match=r"class outputs.*shape \(3,\)"):
            Augmenter("hflip", uncertainty=name)(forward, x)


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_accumulator_memory_is_constant_in_views(activation):
    generator = torch.Generator().manual_seed(5)
    held = {}
    for stacks in (2, 50):
        tracker = UncertaintyAccumulator(UNCERTAINTIES, "prob", activation)
        for _ in range(stacks):
            tracker.add(torch.randn(1, 3, 4, generator=generator))
        tracker.result(torch.randn(3, 4))
        tensors = [v for v in vars(tracker).values() if isinstance(v, torch.Tensor)]
        assert not any(isinstance(v, list | tuple) and v and torch.is_tensor(v[0]) for v in vars(tracker).values())
        held[stacks] = (len(tensors), sum(t.numel() for t in tensors))
    assert held[2] == held[50]
