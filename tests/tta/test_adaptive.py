"""TestTimeAugmentation(stop=...): views in order per sample, against a per-sample loop written out."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from ttt_models import trainer

import ttc_lightning as ttc
from ttc_lightning import stopping


class Counting(ttc.TestTimeComputeMixin, L.LightningModule):
    """A batch-independent conv classifier that counts the rows it sees."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
        self.rows = 0

    def forward(self, x):
        self.rows += len(x)
        return 12 * self.net(x)


def images(n: int = 24) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def d4_views(x: torch.Tensor) -> list[torch.Tensor]:
    """d4 in ttach's order, written out: h-flip outer (off, on), rot90 k = 0..3 inner."""
    return [torch.rot90(v, k, (2, 3)) for v in (x, x.flip(-1)) for k in range(4)]


def reference(model: Counting, x: torch.Tensor, threshold: float):
    """Each sample alone: views in order until the mean softmax of its views reaches ``threshold``; the output is
    the mean of the raw outputs of the views it saw."""
    outputs, counts = [], []
    with torch.no_grad():
        for row in x:
            ys = []
            for view in d4_views(row[None]):
                ys.append(12 * model.net(view))
                if torch.stack(ys).softmax(2).mean(0).amax() >= threshold:
                    break
            outputs.append(torch.stack(ys).mean(0)[0])
            counts.append(len(ys))
    return torch.stack(outputs), torch.tensor(counts)


def predict(model, x, callback, batch_size=8):
    out = trainer([callback]).predict(model, DataLoader(x, batch_size=batch_size))
    if isinstance(out[0], dict):
        return {k: torch.cat([o[k] for o in out]) for k in out[0]}
    return torch.cat(out)


def test_adaptive_views_match_the_per_sample_loop():
    model, x = Counting(), images()
    cb = ttc.TestTimeAugmentation("d4", stop=stopping.Confidence(0.6), return_views=True)
    out = predict(model, x, cb)
    expected, counts = reference(model, x, 0.6)
    assert torch.equal(out["views"], counts)
    assert counts.min() == 1 and counts.max() == 8 and len(set(counts.tolist())) > 2
    torch.testing.assert_close(out["prediction"], expected, atol=1e-5, rtol=1e-5)
    assert model.rows == int(counts.sum())  # halted samples left the forward batch
    assert cb.figures()["saved"] == pytest.approx(1 - counts.sum().item() / (8 * len(x)))


def test_batch_of_one_gives_the_same_outputs_and_counts():
    model, x = Counting(), images()
    make = lambda: ttc.TestTimeAugmentation("d4", stop=stopping.Margin(0.6) | stopping.Stable(3), return_views=True)  # noqa: E731
    batched, alone = predict(model, x, make(), batch_size=24), predict(model, x, make(), batch_size=1)
    assert torch.equal(batched["views"], alone["views"])
    torch.testing.assert_close(batched["prediction"], alone["prediction"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("merge", ["mean", "max", "gmean", "vote"])
def test_a_rule_that_never_holds_gives_the_full_policy(merge):
    model, x = Counting(), images()
    full = predict(model, x, ttc.TestTimeAugmentation("d4", merge=merge, uncertainty=True))
    adaptive = predict(
        model, x, ttc.TestTimeAugmentation("d4", merge=merge, uncertainty=True, stop=stopping.Confidence(1.0))
    )
    assert full.keys() == adaptive.keys()
    for key in full:
        torch.testing.assert_close(adaptive[key], full[key], atol=1e-5, rtol=1e-5)


def test_min_views_and_anytime():
    model, x = Counting(), images()
    out = predict(
        model, x, ttc.TestTimeAugmentation("d4", stop=stopping.Confidence(0.5), min_views=3, return_views=True)
    )
    assert out["views"].min() == 3
    anytime = predict(model, x, ttc.TestTimeAugmentation("d4", stop=stopping.Confidence(1.0), anytime=True))
    with torch.no_grad():  # the running merge after each number of views; the most confident one is kept
        ys = torch.stack([12 * model.net(v) for v in d4_views(x)])
        running = torch.stack([ys[: k + 1].mean(0) for k in range(8)])
        scores = torch.stack([ys[: k + 1].softmax(2).mean(0).amax(1) for k in range(8)])
    best = scores.argmax(0)
    assert (best < 7).any()
    torch.testing.assert_close(anytime, running[best, torch.arange(len(x))], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(stop=stopping.Confidence(), merge="median"), "median"),
        (dict(stop=stopping.Confidence(), chunk_size=None), "chunk_size"),
        (dict(stop=stopping.Confidence(), task="segmentation"), "task"),
        (dict(stop=stopping.Confidence(), min_views=9), "min_views"),
        (dict(anytime=True), "stop"),
        (dict(return_views=True), "stop"),
    ],
)
def test_bad_combinations_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ttc.TestTimeAugmentation("d4", **kwargs)


def test_stop_must_be_a_rule():
    with pytest.raises(TypeError, match="stop"):
        ttc.TestTimeAugmentation("d4", stop=0.9)
