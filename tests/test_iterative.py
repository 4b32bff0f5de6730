"""IterativeInference: refinement and sampling against loops written out per sample, compaction, composition."""

import copy
import functools

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from ttt_models import trainer

import ttc_lightning as ttc
from ttc_lightning import stopping

FEATURES, HIDDEN, CLASSES = 6, 16, 4


class FixedPoint(ttc.TestTimeComputeMixin, L.LightningModule):
    """``h <- tanh(W h + U x)``, output ``head(h)``: a contraction, so each sample converges at its own rate.
    Counts the rows pushed through ``ttc_refine`` and ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.U, self.W = nn.Linear(FEATURES, HIDDEN), nn.Linear(HIDDEN, HIDDEN, bias=False)
            self.head = nn.Linear(HIDDEN, CLASSES)
        with torch.no_grad():
            self.W.weight.mul_(0.6)
            self.head.weight.mul_(4)
        self.rows = 0

    def forward(self, x):
        self.rows += len(x)
        return self.head(torch.tanh(self.U(x)))

    def ttc_init(self, x):
        return torch.zeros(len(x), HIDDEN)

    def ttc_refine(self, x, h):
        self.rows += len(x)
        h = torch.tanh(self.W(h) + self.U(x))
        return self.head(h), h


class Dropper(ttc.TestTimeComputeMixin, L.LightningModule):
    """An MLP with dropout; counts the rows of ``forward``."""

    def __init__(self, p: float = 0.3) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Dropout(p), nn.Linear(32, CLASSES))
        self.rows = 0

    def forward(self, x):
        self.rows += len(x)
        return 3 * self.net(x)


def inputs(n: int = 21) -> torch.Tensor:
    """Rows of growing norm: they converge at different rates."""
    return torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 3, n)[:, None]


def predict(model, x, callbacks, batch_size=8):
    out = trainer(callbacks).predict(model, DataLoader(x, batch_size=batch_size))
    if isinstance(out[0], dict):
        return {k: torch.cat([o[k] for o in out]) for k in out[0]}
    return torch.cat(out)


def refine_reference(model: FixedPoint, x: torch.Tensor, tol: float, max_iters: int, min_iters: int = 1):
    """Each sample alone: iterate until the relative L2 change of the output is <= tol (not before min_iters)."""
    outputs, counts = [], []
    with torch.no_grad():
        for row in x:
            h, previous = torch.zeros(1, HIDDEN), None
            for t in range(1, max_iters + 1):
                h = torch.tanh(model.W(h) + model.U(row[None]))
                y = model.head(h)
                change = float("inf") if previous is None else ((y - previous).norm() / previous.norm()).item()
                if (t >= min_iters and change <= tol) or t == max_iters:
                    break
                previous = y
            outputs.append(y[0])
            counts.append(t)
    return torch.stack(outputs), torch.tensor(counts)


@pytest.mark.parametrize("min_iters", [1, 6])
def test_refine_matches_per_sample_loop_and_compacts(min_iters):
    x, model = inputs(), FixedPoint()
    cb = ttc.IterativeInference(
        mode="refine", stop=stopping.Converged(1e-3), max_iters=40, min_iters=min_iters, return_iterations=True
    )
    out = predict(model, x, [cb])
    expected, counts = refine_reference(model, x, 1e-3, 40, min_iters)
    assert torch.equal(out["iterations"], counts)
    assert len(set(counts.tolist())) > 1  # samples really halt at different iterations
    torch.testing.assert_close(out["prediction"], expected, atol=1e-5, rtol=1e-5)
    assert model.rows == int(counts.sum())  # halted samples left the batch
    figures = cb.figures()
    assert figures["iterations"] == pytest.approx(counts.float().mean().item())
    assert figures["saved"] == pytest.approx(1 - counts.sum().item() / (40 * len(x)))
    assert figures["halted/Converged(0.001)"] + figures["halted/max_iters"] == pytest.approx(1.0)


def test_refine_is_batch_independent():
    x, model = inputs(), FixedPoint()
    make = functools.partial(ttc.IterativeInference, "refine", stopping.Converged(1e-4), 30, return_iterations=True)
    batched = predict(model, x, [make()], batch_size=21)
    alone = predict(model, x, [make()], batch_size=1)
    assert torch.equal(batched["iterations"], alone["iterations"])
    torch.testing.assert_close(batched["prediction"], alone["prediction"], atol=1e-6, rtol=1e-6)


def test_without_stop_every_sample_runs_max_iters():
    x, model = inputs(), FixedPoint()
    out = predict(model, x, [ttc.IterativeInference(mode="refine", max_iters=5)])
    assert model.rows == 5 * len(x)
    expected, _ = refine_reference(model, x, -1.0, 5)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_anytime_returns_the_best_scoring_iteration():
    x, model = inputs(), FixedPoint()
    rule = stopping.Confidence(0.999999)  # never holds here: every sample runs max_iters
    out = predict(model, x, [ttc.IterativeInference(mode="refine", stop=rule, max_iters=6, anytime=True)])
    with torch.no_grad():  # reference: outputs of every iteration, the most confident kept (first on ties)
        h, ys = torch.zeros(len(x), HIDDEN), []
        for _ in range(6):
            h = torch.tanh(model.W(h) + model.U(x))
            ys.append(model.head(h))
        ys = torch.stack(ys)
        best = ys.softmax(2).amax(2).argmax(0)
    assert rule.stops is not None
    torch.testing.assert_close(out, ys[best, torch.arange(len(x))], atol=1e-6, rtol=1e-6)
    assert (best < 5).any()  # the last iteration is not always the best: the test can tell the difference


def test_warm_start_continues_from_the_previous_batch():
    model = FixedPoint()
    row = inputs(4)
    x = torch.cat([row, row])  # two identical batches of 4
    cb = ttc.IterativeInference(
        mode="refine", stop=stopping.Converged(1e-3), max_iters=40, warm_start=True, return_iterations=True
    )
    out = predict(model, x, [cb], batch_size=4)
    cold, warm = out["iterations"][:4], out["iterations"][4:]
    assert (warm < cold).all()  # the second batch starts at (near) its fixed point
    assert (warm <= 2).all()
    # a batch of another size starts from ttc_init again
    out = predict(model, torch.cat([row, row[:3]]), [cb], batch_size=4)
    assert torch.equal(out["iterations"][4:], out["iterations"][:3])


def mc_reference(model: Dropper, x: torch.Tensor, draws: int, seed: int = 0) -> torch.Tensor:
    """MC dropout written out: the first seed drawn from ``Generator(seed)``, ``draws`` passes with dropout active,
    the log of the mean softmax."""
    generator = torch.Generator().manual_seed(seed)
    net = copy.deepcopy(model.net).train()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        probs = torch.stack([(3 * net(x)).softmax(1) for _ in range(draws)]).mean(0)
    return probs.log()


def test_sample_mode_is_mc_dropout_and_leaves_rng_and_modes_alone():
    x, model = inputs(8), Dropper()
    torch.manual_seed(123)
    predict(model, x, [], batch_size=8)  # the DataLoader itself draws from the global generator
    state, model.rows = torch.get_rng_state(), 0
    torch.manual_seed(123)
    out = predict(model, x, [ttc.IterativeInference(mode="sample", max_iters=7)], batch_size=8)
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(out, mc_reference(model, x, 7), atol=1e-6, rtol=1e-6)
    assert model.rows == 7 * 8
    again = predict(model, x, [ttc.IterativeInference(mode="sample", max_iters=7)], batch_size=8)
    assert torch.equal(out, again)  # seeded: runs repeat
    assert model.net[2].training  # the module's modes are as they were (a fresh module is in train mode)


def test_sample_mode_halts_per_sample_and_compacts():
    x, model = inputs(40), Dropper(0.2)
    cb = ttc.IterativeInference(
        mode="sample", stop=stopping.BetaVote(0.95) | stopping.Entropy(0.01), max_iters=16, return_iterations=True
    )
    out = predict(model, x, [cb])
    its = out["iterations"]
    assert model.rows == int(its.sum())
    assert its.min() >= 1 and its.max() <= 16 and len(set(its.tolist())) > 1
    figures = cb.figures()
    assert figures["iterations"] == pytest.approx(its.float().mean().item())
    assert 0 < figures["halted/BetaVote(0.95)"] < 1 and figures["halted/Entropy(0.01)"] == 0
    assert its.min() >= 4  # BetaVote at 0.95 needs at least 4 unanimous votes: 1 - 2^-5 >= 0.95 > 1 - 2^-4


def test_sample_mode_with_random_augment_and_no_dropout():
    x = torch.rand(6, 3, 8, 8)
    model = Dropper(0.0)
    model.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, CLASSES))
    cb = ttc.IterativeInference(mode="sample", max_iters=3, augment=ttc.RandomAugment(seed=1))
    first = predict(model, x, [cb])
    second = predict(model, x, [cb])
    assert torch.equal(first, second)  # the augmentation is reseeded at each stage
    with torch.no_grad():
        plain = model(x)
    assert not torch.allclose(first, plain.log_softmax(1))


def test_sample_mode_wraps_augmentation():
    x, model = inputs(6), Dropper()
    x = x[:, :, None, None].expand(-1, -1, 1, 2).contiguous()  # (B, 6, 1, 2) "images" for an h-flip
    model.net = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(12, CLASSES))
    cbs = [ttc.TestTimeAugmentation("hflip", uncertainty=True), ttc.IterativeInference(mode="sample", max_iters=4)]
    out = predict(model, x, cbs)
    assert isinstance(out, torch.Tensor) and out.shape == (6, CLASSES)  # the inner extras are dropped
    assert model.rows == 4 * 2 * 6


def test_adaptation_wraps_iterative_inference_and_restores_the_model():
    from ttt_models import conv_net

    class Net(ttc.TestTimeComputeMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = conv_net(norm="batch")
            self.drop = nn.Dropout(0.2)

        def forward(self, x):
            return self.net(self.drop(x))

    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(12, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    tent = ttc.Tent(optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    out = predict(model, x, [ttc.IterativeInference(mode="sample", max_iters=3), tent], batch_size=4)
    assert out.shape == (12, 4) and torch.isfinite(out).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mode="loop"), ValueError, "mode"),
        (dict(stop="Confidence"), TypeError, "stop"),
        (dict(max_iters=0), ValueError, "max_iters"),
        (dict(max_iters=3, min_iters=4), ValueError, "min_iters"),
        (dict(space="probability"), ValueError, "space"),
        (dict(mode="refine", augment=ttc.RandomAugment()), ValueError, "augment"),
        (dict(mode="sample", warm_start=True), ValueError, "warm_start"),
        (dict(anytime=True), ValueError, "anytime"),
        (dict(seed=-1), ValueError, "seed"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        ttc.IterativeInference(**kwargs)


def test_missing_requirements_fail_before_any_batch():
    model = Dropper(0.0)
    with pytest.raises(ValueError, match="no dropout layer"):
        predict(model, inputs(), [ttc.IterativeInference(mode="sample")])
    assert model.rows == 0
    with pytest.raises(TypeError, match="ttc_init, ttc_refine"):
        predict(model, inputs(), [ttc.IterativeInference(mode="refine")])
    model = FixedPoint()
    x = inputs()[:, :, None, None].expand(-1, -1, 1, 2).contiguous()
    with pytest.raises(ValueError, match="cannot run inside"):
        predict(model, x, [ttc.IterativeInference(mode="refine"), ttc.TestTimeAugmentation("hflip")])
    assert model.rows == 0 and "forward" not in model.__dict__


def test_class_rules_need_class_outputs():
    class Denoiser(FixedPoint):
        def ttc_refine(self, x, h):
            h = torch.tanh(self.W(h) + self.U(x))
            return h[:, :, None], h  # (B, HIDDEN, 1): not class logits

    model = Denoiser()
    out = predict(model, inputs(), [ttc.IterativeInference("refine", stopping.Converged(1e-3), 30)])
    assert out.shape == (21, HIDDEN, 1)
    with pytest.raises(ValueError, match="Converged"):
        predict(model, inputs(), [ttc.IterativeInference("refine", stopping.Confidence(0.9), 30)])
