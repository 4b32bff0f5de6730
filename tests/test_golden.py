"""Golden outputs: every adaptation preset, TTA merge and task, and iterative mode on fixed small inputs.

The outputs in ``tests/golden/outputs.pt`` were written by the code before the core redesign (issue 11, commit
dcb2117) with ``python tests/test_golden.py --write``. A refactor must reproduce them bitwise; a case whose
arithmetic a shared operation reorders may carry ``tol=1e-6`` (absolute and relative), never more. Each case is
a function returning the predictions (and, for adaptation, the figures) of one run.
"""

import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from ttt_models import ConvNet, images, loader, trainer

import ttc_lightning as ttc
from ttc_lightning import stopping

GOLDEN = Path(__file__).parent / "golden" / "outputs.pt"
FIGURES = ("updates", "backwards", "resets", "skipped", "last_loss", "kept_fraction")
SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
ADAM = functools.partial(torch.optim.Adam, lr=1e-2)

CASES: dict[str, Callable[[], Any]] = {}
#: Cases allowed a tolerance (name -> absolute and relative tolerance, at most 1e-6).
TOLERANCES: dict[str, float] = {}


def case(fn: Callable[[], Any]) -> Callable[[], Any]:
    CASES[fn.__name__] = fn
    return fn


def predict(model: L.LightningModule, callbacks: list, data: DataLoader) -> list:
    torch.manual_seed(0)
    return trainer(callbacks).predict(model, data)


def adapt(callback: ttc.TestTimeCallback, extra: tuple = (), classes: int = 4, data: DataLoader | None = None) -> dict:
    """Predictions of ``callback`` (plus ``extra`` callbacks) on three batches of 8, and its figures."""
    model = ConvNet(classes=classes, scale=1.0 if classes == 4 else 6.0)
    out = predict(model, [callback, *extra], data or loader(images(24, seed=3)))
    return {"predictions": out, "figures": {k: getattr(callback, k, None) for k in FIGURES}}


# -- adaptation presets ------------------------------------------------------------------------------------------


@case
def tent() -> dict:
    return adapt(ttc.Tent())


@case
def tent_sgd_steps3_episodic() -> dict:
    return adapt(ttc.Tent(optimizer=SGD, steps=3, episodic=True))


@case
def tent_all_params_adam() -> dict:
    return adapt(ttc.Tent(optimizer=ADAM, params="all", steps=2))


@case
def tent_flags_clip() -> dict:
    return adapt(ttc.Tent(optimizer=ADAM, updates=ttc.Updates(clip_grad=0.1), flags=True))


@case
def ttt_reset_every_2_tol() -> dict:
    return adapt(
        ttc.TestTimeTraining(optimizer=SGD, steps=4, updates=ttc.Updates(tol=1e-3), resets=ttc.Resets(every=2))
    )


@case
def ttt_norm_mix_scheduler() -> dict:
    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    norm, updates = ttc.NormStatistics("mix", alpha=0.3), ttc.Updates(scheduler=scheduler)
    return adapt(ttc.TestTimeTraining(optimizer=ADAM, norm=norm, steps=2, updates=updates))


@case
def ttt_norm_ema_collapse() -> dict:
    return adapt(
        ttc.TestTimeTraining(
            optimizer=ADAM, norm=ttc.NormStatistics("ema", momentum=0.2), resets=ttc.Resets(on_collapse=0.5)
        )
    )


@case
def eata() -> dict:
    return adapt(ttc.EATA(optimizer=SGD, e_margin=0.9, d_margin=0.999), classes=10)


@case
def eata_fisher() -> dict:
    fisher = loader(images(16, seed=9))
    return adapt(
        ttc.EATA(optimizer=SGD, e_margin=0.9, d_margin=0.999, fisher_data=fisher, fisher_alpha=50.0), classes=10
    )


@case
def sar() -> dict:
    return adapt(ttc.SAR(optimizer=SGD, e_margin=0.9, reset_below=0.3), classes=10)


@case
def memo() -> dict:
    return adapt(ttc.MEMO(optimizer=SGD, steps=2), data=loader(images(8, seed=3), batch_size=4))


@case
def cotta() -> dict:
    return adapt(ttc.CoTTA(optimizer=SGD, anchor_threshold=0.5, restore_prob=0.3, views=4))


@case
def bn_batch() -> dict:
    return adapt(ttc.BatchNormAdapt())


@case
def bn_mix() -> dict:
    return adapt(ttc.BatchNormAdapt(norm="mix", alpha=0.25))


@case
def bn_ema() -> dict:
    return adapt(ttc.BatchNormAdapt(norm="ema", momentum=0.3))


# -- compositions -----------------------------------------------------------------------------------------------


@case
def tent_under_tta_d4() -> dict:
    return adapt(ttc.Tent(optimizer=ADAM), (ttc.TestTimeAugmentation("d4", chunk_size=1),))


@case
def tent_around_iterative_sample() -> dict:
    return adapt(ttc.Tent(optimizer=ADAM), (ttc.IterativeInference(mode="sample", max_iters=3, augment=_noise),))


@case
def bn_under_tta_uncertainty() -> dict:
    return adapt(ttc.BatchNormAdapt(), (ttc.TestTimeAugmentation("hflip", uncertainty=True, chunk_size=1),))


def _noise(x: torch.Tensor) -> torch.Tensor:
    return x + 0.1 * torch.randn_like(x)


# -- test-time augmentation ----------------------------------------------------------------------------------------


def _classifier() -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.Linear(24, 5)
        ).requires_grad_(False)
    with torch.no_grad():
        net[-1].weight.mul_(8)
    return net


class Plain(ttc.TestTimeComputeMixin, L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _tta(**options: Any) -> list:
    x = torch.randn(16, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    return predict(Plain(_classifier()), [ttc.TestTimeAugmentation(**options)], DataLoader(x, batch_size=8))


for _merge in ("mean", "sum", "max", "min", "gmean", "tsharpen", "median", "vote"):
    CASES[f"tta_d4_{_merge}"] = functools.partial(_tta, transforms="d4", merge=_merge)
for _space in ("prob", "logprob"):
    CASES[f"tta_flip_mean_{_space}"] = functools.partial(_tta, transforms="flip", space=_space)
CASES["tta_sigmoid_prob_max"] = functools.partial(
    _tta, transforms="hflip", merge="max", space="prob", activation="sigmoid"
)
CASES["tta_multiscale"] = functools.partial(_tta, transforms="multiscale")
CASES["tta_ten_crop"] = functools.partial(_tta, transforms="ten_crop")
CASES["tta_uncertainty_all"] = functools.partial(
    _tta, transforms="d4", uncertainty=["std", "entropy", "mutual_info", "agreement"]
)
CASES["tta_adaptive_confidence"] = functools.partial(_tta, transforms="d4", stop=stopping.Confidence(0.5))
CASES["tta_adaptive_anytime_views"] = functools.partial(
    _tta, transforms="d4", stop=stopping.Margin(0.2), anytime=True, min_views=2
)
CASES["tta_return_views"] = functools.partial(_tta, transforms="flip", stop=stopping.Entropy(0.6), return_views=True)


def _task(task: str | ttc.tta.Task, transforms: str, model: Callable, channels: int) -> torch.Tensor:
    x = torch.rand(4, channels, 12, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        merged, _ = ttc.Augmenter(transforms=transforms, task=task)(model, x)
    return merged


def _segmenter() -> Callable:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 3, 3, padding=1)
    return conv


def _keypoints(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    cols, rows = torch.arange(w, dtype=x.dtype) + 0.5, torch.arange(h, dtype=x.dtype) + 0.5
    mass = x.sum((-2, -1))
    return torch.stack([(x.sum(-2) * cols).sum(-1) / mass, (x.sum(-1) * rows).sum(-1) / mass], dim=-1)


def _boxes(x: torch.Tensor) -> torch.Tensor:
    c = _keypoints(x)
    return torch.cat([c - 1.5, c + 2.0], dim=-1)


CASES["task_segmentation_d4"] = lambda: _task("segmentation", "d4", _segmenter(), 3)
CASES["task_segmentation_flip_classes"] = lambda: _task(
    ttc.tta.Segmentation(flip_classes=[[0, 1]]), "flip", _segmenter(), 3
)
CASES["task_segmentation_multiscale"] = lambda: _task("segmentation", "multiscale", _segmenter(), 3)
CASES["task_keypoints_d4_pairs"] = lambda: _task(ttc.tta.Keypoints(flip_pairs=[[1, 2]]), "d4", _keypoints, 3)
CASES["task_boxes_d4"] = lambda: _task("boxes", "d4", _boxes, 2)


@case
def wrapper_d4_chunked() -> torch.Tensor:
    x = torch.randn(6, 3, 12, 10, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return ttc.TTAWrapper(_classifier(), transforms="d4", merge="gmean", chunk_size=3)(x)


# -- iterative inference -----------------------------------------------------------------------------------------


class FixedPoint(ttc.TestTimeComputeMixin, L.LightningModule):
    """``h <- tanh(W h + U x)``, output ``head(h)``; a Dropout makes sample mode stochastic."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.U, self.W, self.head = nn.Linear(6, 16), nn.Linear(16, 16, bias=False), nn.Linear(16, 5)
            self.drop = nn.Dropout(0.3)
        with torch.no_grad():
            self.W.weight.mul_(0.6)
            self.head.weight.mul_(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.tanh(self.U(x))))

    def ttc_init(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), 16)

    def ttc_refine(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.W(h) + self.U(x))
        return self.head(h), h


def _iterative(**options: Any) -> list:
    x = torch.randn(21, 6, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 3, 21)[:, None]
    return predict(FixedPoint(), [ttc.IterativeInference(**options)], DataLoader(x, batch_size=8))


CASES["iter_refine_converged"] = functools.partial(
    _iterative, mode="refine", stop=stopping.Converged(1e-3), max_iters=12, return_iterations=True
)
CASES["iter_refine_anytime_warm"] = functools.partial(
    _iterative, mode="refine", stop=stopping.Confidence(0.9), max_iters=6, anytime=True, warm_start=True
)
CASES["iter_sample_mc_dropout"] = functools.partial(_iterative, mode="sample", max_iters=7)
CASES["iter_sample_random_augment"] = lambda: _iterative_images(augment=ttc.RandomAugment(seed=2))
CASES["iter_sample_stable_logprob"] = functools.partial(
    _iterative,
    mode="sample",
    stop=stopping.Stable(2) | stopping.Margin(0.5),
    max_iters=8,
    space="logprob",
    return_iterations=True,
)
CASES["iter_sample_betavote_augment"] = functools.partial(
    _iterative, mode="sample", stop=stopping.BetaVote(0.9), max_iters=9, augment=_noise, min_iters=2, seed=3
)


def _iterative_images(**options: Any) -> list:
    x = torch.rand(12, 3, 12, 10, generator=torch.Generator().manual_seed(6))
    callback = ttc.IterativeInference(mode="sample", max_iters=3, **options)
    return predict(Plain(_classifier()), [callback], DataLoader(x, batch_size=8))


# -- comparison ----------------------------------------------------------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key in sorted(value) for k, v in _flatten(value[key], f"{prefix}/{key}").items()}
    if isinstance(value, list | tuple):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix}/{i}").items()}
    return {prefix: value}


def _same(got: Any, want: Any, tol: float | None) -> bool:
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.shape != want.shape:
            return False
        if tol is None:
            return torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
        return torch.allclose(got, want, atol=tol, rtol=tol, equal_nan=True)
    if isinstance(want, float) and isinstance(got, float) and math.isnan(want):
        return math.isnan(got)
    if isinstance(want, float) and isinstance(got, float) and tol is not None:
        return math.isclose(got, want, abs_tol=tol, rel_tol=tol)
    return type(got) is type(want) and got == want


def _golden() -> dict[str, Any]:
    if not GOLDEN.exists():
        pytest.fail(f"{GOLDEN} is missing: it is committed with the tests.")
    return torch.load(GOLDEN, weights_only=False)


def test_every_case_has_a_golden_output_and_tolerances_stay_small() -> None:
    assert sorted(_golden()) == sorted(CASES)
    assert all(0 < tol <= 1e-6 for tol in TOLERANCES.values())


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_equals_the_golden_output(name: str) -> None:
    want = _flatten(_golden()[name])
    got = _flatten(CASES[name]())
    assert sorted(got) == sorted(want), name
    tol = TOLERANCES.get(name)
    bad = [key for key in want if not _same(got[key], want[key], tol)]
    assert not bad, f"{name}: {bad[:5]} differ from the golden output"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    torch.set_num_threads(1)
    GOLDEN.parent.mkdir(exist_ok=True)
    torch.save({name: fn() for name, fn in CASES.items()}, GOLDEN)
    print(f"wrote {len(CASES)} cases to {GOLDEN}")
