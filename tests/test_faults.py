"""Faults mid-predict, for every strategy: an exception or a KeyboardInterrupt in the second batch, or non-finite
inputs, leave the model exactly as it was before predict and the Trainer's flags as they were."""

import functools

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from ttt_models import trainer

import ttc_lightning as ttc
from ttc_lightning import stopping

SGD = functools.partial(torch.optim.SGD, lr=0.05)
STRATEGIES = {
    "tta": lambda: [ttc.TestTimeAugmentation("d4")],
    "tta_adaptive": lambda: [ttc.TestTimeAugmentation("d4", stop=stopping.Confidence(0.99))],
    "refine": lambda: [ttc.IterativeInference("refine", stopping.Converged(1e-6), 5)],
    "sample": lambda: [ttc.IterativeInference("sample", max_iters=3)],
    "bn": lambda: [ttc.BatchNormAdapt()],
    "tent": lambda: [ttc.Tent(optimizer=SGD, resets=ttc.Resets(on_nonfinite=True))],
    "eata": lambda: [ttc.EATA(optimizer=SGD, e_margin=0.9, d_margin=0.9)],
    "sar": lambda: [ttc.SAR(optimizer=SGD, e_margin=0.9)],
    "memo": lambda: [ttc.MEMO(optimizer=SGD, views=2)],
    "cotta": lambda: [ttc.CoTTA(optimizer=SGD, views=2)],
    "tent+sample+tta": lambda: [
        ttc.Tent(optimizer=SGD),
        ttc.IterativeInference("sample", max_iters=2),
        ttc.TestTimeAugmentation("hflip"),
    ],
}


class Faulty(ttc.TestTimeComputeMixin, L.LightningModule):
    """conv, BatchNorm, ReLU, dropout, pool, linear, with refinement hooks; raises ``error`` on forward call
    ``fail_at`` (counting ``forward`` and ``ttc_refine`` calls)."""

    def __init__(self, error: BaseException | None = None, fail_at: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.2), nn.AdaptiveAvgPool2d(2), nn.Flatten()
            )
            self.head = nn.Linear(24, 4)
            self.net[1].running_mean.uniform_(-0.2, 0.2)
        self.error, self.fail_at, self.calls = error, fail_at, 0

    def _count(self) -> None:
        self.calls += 1
        if self.error is not None and self.calls == self.fail_at:
            raise self.error

    def forward(self, x):
        self._count()
        return self.head(self.net(x))

    def ttc_init(self, x):
        return torch.zeros(len(x), 4)

    def ttc_refine(self, x, state):
        self._count()
        out = self.head(self.net(x)) + 0.5 * state
        return out, out


def state(model: nn.Module) -> dict:
    """Everything a strategy may touch, copied: tensors, modes, requires_grad, BatchNorm flags, forward attribute."""
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "grad": [p.requires_grad for p in model.parameters()],
        "bn": [(m.track_running_stats, m.momentum) for m in model.modules() if isinstance(m, nn.BatchNorm2d)],
        "forward": "forward" in model.__dict__,
    }


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for k, v in before["tensors"].items():
        assert torch.equal(v, after["tensors"][k]), k
    assert {k: v for k, v in before.items() if k != "tensors"} == {k: v for k, v in after.items() if k != "tensors"}


def images(n: int = 24) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("error, raised", [(RuntimeError("boom"), RuntimeError), (KeyboardInterrupt(), SystemExit)])
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_an_error_in_the_second_batch_leaves_model_and_trainer_as_they_were(name, error, raised):
    probe = Faulty()  # how many forward calls the first batch makes
    trainer(STRATEGIES[name]()).predict(probe, DataLoader(TensorDataset(images(8)), batch_size=8))
    model = Faulty(error, fail_at=probe.calls + 1)  # the first call of the second batch
    before = state(model)
    run = trainer(STRATEGIES[name]())
    with pytest.raises(raised):
        run.predict(model, DataLoader(TensorDataset(images()), batch_size=8))
    assert model.calls == probe.calls + 1
    assert_same(before, state(model))
    assert run.predict_loop.inference_mode is True


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_non_finite_inputs_leave_the_model_as_it_was(name):
    x = images()
    x[8:16] = float("nan")  # the whole second batch
    x[20, 0, 0, 0] = float("inf")
    model = Faulty()
    before = state(model)
    out = trainer(STRATEGIES[name]()).predict(model, DataLoader(TensorDataset(x), batch_size=8))
    out = torch.cat([o["prediction"] if isinstance(o, dict) else o for o in out])
    assert out.shape == (24, 4)  # every input gets exactly one prediction
    assert torch.isfinite(out[:8]).all()  # the batch before the fault is unaffected
    assert_same(before, state(model))
