"""Chunking views into forward calls: shapes per call, equality with stacked views, extra forward arguments."""

import math

import pytest
import torch
from torch import nn

import ttc_lightning as ttc
from ttc_lightning.tta.augmenter import Augmenter
from ttc_lightning.tta.views import View

B, H, W = 3, 6, 8  # non-square: rot90 views have shape (W, H)


class Recorder(nn.Module):
    """A batch-independent conv classifier (no BatchNorm) that records the input of each forward call."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(24, 5)
        )
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.inputs.append(x)
        return self.net(x)


def images() -> torch.Tensor:
    return torch.randn(B, 3, H, W, generator=torch.Generator().manual_seed(1))


def d4_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The eight d4 views written out (h-flip outer, rot90 k = 0..3 inner)."""
    return [torch.rot90(x.flip(-1) if h else x, k, (-2, -1)) for h in (False, True) for k in range(4)]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 8, None])
def test_d4_on_non_square_inputs_groups_views_by_shape_and_bounds_each_call(chunk_size):
    model, x = Recorder(), images()
    with torch.no_grad():
        out = ttc.TTAWrapper(model, transforms="d4", chunk_size=chunk_size)(x)
        expected = torch.stack([model.net(view) for view in d4_views(x)]).mean(0)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    per_shape = 4  # views of shape (H, W) and of shape (W, H)
    step = min(chunk_size or per_shape, per_shape)
    assert len(model.inputs) == 2 * math.ceil(per_shape / step)
    seen = []
    for inputs in model.inputs:
        assert inputs.shape[0] % B == 0 and inputs.shape[0] // B <= (chunk_size or 8)
        assert tuple(inputs.shape[-2:]) in {(H, W), (W, H)}
        seen += list(inputs.split(B))
    assert len(seen) == 8  # each view exactly once, samples aligned within the stacked views
    for view in d4_views(x):
        assert sum(torch.equal(view, piece) for piece in seen) == 1


def test_chunked_equals_stacked_on_segmentation_over_d4():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1))
    x = images()
    with torch.no_grad():
        results = [
            ttc.TTAWrapper(model, transforms="d4", task="segmentation", merge=merge, chunk_size=chunk_size)(x)
            for merge in ("mean", "median", "max")
            for chunk_size in (1, 3, None)
        ]
    for i in range(0, 9, 3):
        for other in results[i + 1 : i + 3]:
            torch.testing.assert_close(other, results[i], rtol=1e-6, atol=1e-6)


def test_auto_chunk_size_is_one_view_per_call_on_cpu():
    model = Recorder()
    ttc.TTAWrapper(model, transforms="d4")(images())
    assert [inputs.shape[0] for inputs in model.inputs] == [B] * 8
    assert Augmenter().chunk_size == "auto"


@pytest.mark.parametrize("chunk_size", [0, -1, "big", True, 2.0])
def test_bad_chunk_size_raises_naming_it(chunk_size):
    for build in (Augmenter, ttc.TestTimeAugmentation, lambda **o: ttc.TTAWrapper(nn.Identity(), **o)):
        with pytest.raises(ValueError, match=f"`chunk_size`={chunk_size!r}"):
            build(chunk_size=chunk_size)


def test_plan_is_cached_per_input_size(monkeypatch):
    checks = []
    original = View.check
    monkeypatch.setattr(View, "check", lambda self, size: checks.append(size) or original(self, size))
    augmenter, model = Augmenter("d4", chunk_size=2), Recorder()
    with torch.no_grad():
        for x in (images(), images(), images().transpose(-2, -1), images()):
            augmenter(model, x)
    assert checks == [(H, W)] * 8 + [(W, H)] * 8  # each size planned once
    assert augmenter.plan((H, W), 2) is augmenter.plan((H, W), 2)
    assert [len(chunk) for chunk in augmenter.plan((H, W), 2)] == [2, 2, 2, 2]
    assert [len(chunk) for chunk in augmenter.plan((H, H), None)] == [8]  # square: one shape, one chunk


class Offset(nn.Module):
    """``f(x) * scale + offset`` with a batch-first ``offset``; checks it is aligned with the stacked views."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Recorder()
        self.calls: list[tuple] = []

    def forward(self, x, offset, weight=None, scale=1.0, sample=None):
        self.calls.append((x.shape[0], offset.shape[0], None if weight is None else weight.shape, scale))
        assert offset.shape[0] == x.shape[0]
        if sample is not None:  # sample ids travel with their images
            assert torch.equal(sample, x[:, 0, 0, 0].round().long())
        out = self.net(x) * scale + offset[:, None]
        return out if weight is None else out * weight


@pytest.mark.parametrize("chunk_size", [1, 3, None])
@pytest.mark.parametrize("as_keyword", [False, True])
def test_batch_first_arguments_are_repeated_with_stacked_views(chunk_size, as_keyword):
    model = Offset()
    x, offset = images(), torch.tensor([0.0, 100.0, -50.0])
    weight, scale = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]), 2.0  # not batch-first: passed unchanged
    with torch.no_grad():
        if as_keyword:
            out = ttc.TTAWrapper(model, transforms="d4", chunk_size=chunk_size)(
                x, offset=offset, weight=weight, scale=scale
            )
        else:
            out = ttc.TTAWrapper(model, transforms="d4", chunk_size=chunk_size)(x, offset, weight, scale)
        expected = (torch.stack([model.net.net(v) for v in d4_views(x)]).mean(0) * scale + offset[:, None]) * weight
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-5)
    for rows, offset_rows, weight_shape, passed_scale in model.calls:
        assert rows == offset_rows and rows <= B * (chunk_size or 4)
        assert weight_shape == (5,) and passed_scale == scale


def test_batch_first_arguments_stay_aligned_with_their_samples():
    model = Offset()
    ids = torch.arange(B)
    x = ids.float().view(B, 1, 1, 1).expand(B, 3, H, W).contiguous()  # every pixel of sample b equals b
    with torch.no_grad():
        for chunk_size in (1, 3, None):
            ttc.TTAWrapper(model, transforms="d4", chunk_size=chunk_size)(x, torch.zeros(B), sample=ids)
    assert max(rows for rows, *_ in model.calls) == 4 * B


def test_zero_dim_tensor_argument_is_passed_unchanged():
    model = Offset()
    scale = torch.tensor(3.0)
    with torch.no_grad():
        out = ttc.TTAWrapper(model, transforms="hflip", chunk_size=None)(images(), torch.zeros(B), scale=scale)
        expected = (model.net.net(images()) + model.net.net(images().flip(-1))) / 2 * 3
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert all(passed is scale for *_, passed in model.calls)
