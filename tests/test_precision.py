"""Every strategy under bf16-mixed on CPU; compiled models; sharded strategies refused with a clear error."""

import functools
import types

import pytest
import torch
from ddp_strategies import ConvNet, Dropper, FixedPoint, inputs
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader, TensorDataset
from ttt_models import trainer

import ttc_lightning as ttc
from ttc_lightning import stopping
from ttc_lightning.callback import check_strategy

SGD = functools.partial(torch.optim.SGD, lr=0.05)
#: name -> (model factory, callbacks factory)
STRATEGIES = {
    "tta": (ConvNet, lambda: [ttc.TestTimeAugmentation("d4", uncertainty=True)]),
    "tta_adaptive": (ConvNet, lambda: [ttc.TestTimeAugmentation("d4", stop=stopping.Confidence(0.7))]),
    "refine": (FixedPoint, lambda: [ttc.IterativeInference("refine", stopping.Converged(1e-2), 20)]),
    "sample": (Dropper, lambda: [ttc.IterativeInference("sample", stopping.BetaVote(0.9), 8)]),
    "bn": (ConvNet, lambda: [ttc.BatchNormAdapt()]),
    "tent": (ConvNet, lambda: [ttc.Tent(optimizer=SGD)]),
    "eata": (ConvNet, lambda: [ttc.EATA(optimizer=SGD, e_margin=0.9, d_margin=0.9)]),
    "sar": (ConvNet, lambda: [ttc.SAR(optimizer=SGD, e_margin=0.9)]),
    "memo": (ConvNet, lambda: [ttc.MEMO(optimizer=SGD, views=4)]),
    "cotta": (ConvNet, lambda: [ttc.CoTTA(optimizer=SGD, views=4)]),
    "tent+tta": (ConvNet, lambda: [ttc.Tent(optimizer=SGD), ttc.TestTimeAugmentation("hflip")]),
}


def loader() -> DataLoader:
    return DataLoader(TensorDataset(inputs()), batch_size=8)


def predictions(out: list) -> torch.Tensor:
    return torch.cat([o["prediction"] if isinstance(o, dict) else o for o in out])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_bf16_mixed_on_cpu_runs_close_to_fp32_and_restores_the_model(name):
    make_model, make_callbacks = STRATEGIES[name]
    fp32 = predictions(trainer(make_callbacks()).predict(make_model(), loader()))
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bf16 = predictions(trainer(make_callbacks(), precision="bf16-mixed").predict(model, loader()))
    assert bf16.dtype in (torch.bfloat16, torch.float32) and torch.isfinite(bf16).all()
    # bf16 keeps 8 significant bits (a relative step of 2**-8): logits within 2% of the largest fp32 logit (about 5
    # bf16 steps of it), probabilities within 0.02, and the same class wherever fp32's top two are 0.04 apart.
    bf16 = bf16.float()
    torch.testing.assert_close(bf16, fp32, atol=0.02 * fp32.abs().max().item(), rtol=0)
    torch.testing.assert_close(bf16.softmax(1), fp32.softmax(1), atol=0.02, rtol=0)
    top2 = fp32.softmax(1).topk(2, 1).values
    clear = top2[:, 0] - top2[:, 1] > 0.04
    assert clear.any() and torch.equal(bf16.argmax(1)[clear], fp32.argmax(1)[clear])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


@pytest.mark.parametrize("name", ["tta", "refine", "tent+tta"])
def test_a_compiled_model_gives_the_same_predictions_and_stays_compiled(name):
    make_model, make_callbacks = STRATEGIES[name]
    eager = predictions(trainer(make_callbacks()).predict(make_model(), loader()))
    model = make_model()
    compiled = torch.compile(model, backend="eager")
    out = predictions(trainer(make_callbacks()).predict(compiled, loader()))
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    # Lightning compiles by replacing forward with an instance attribute: it is still there afterwards
    assert model._compiler_ctx is not None and "forward" in model.__dict__
    assert not isinstance(model.__dict__["forward"], ttc.pipeline.ComposedForward)


@pytest.mark.slow
def test_inductor_compiled_model():
    make_model, make_callbacks = STRATEGIES["tent+tta"]
    eager = predictions(trainer(make_callbacks()).predict(make_model(), loader()))
    out = predictions(trainer(make_callbacks()).predict(torch.compile(make_model()), loader()))
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)


def test_sharded_strategies_are_refused_before_any_batch():
    with pytest.raises(RuntimeError, match=r"FSDPStrategy.*strategy='ddp'"):
        check_strategy(types.SimpleNamespace(strategy=FSDPStrategy()))
    deepspeed = type("DeepSpeedStrategy", (), {})  # DeepSpeed itself is not installed here
    with pytest.raises(RuntimeError, match="DeepSpeedStrategy"):
        check_strategy(types.SimpleNamespace(strategy=deepspeed()))
    check_strategy(types.SimpleNamespace(strategy=object()))  # anything else passes
