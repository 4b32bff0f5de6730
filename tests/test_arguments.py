"""No argument is accepted and then ignored: every argument of every public class, set to a non-default value in
turn, either changes behaviour or is refused by name.

The parameters are discovered from the signatures of the public classes (``ttc_lightning.__all__`` and
``ttc_lightning.tta.__all__`` and ``ttc_lightning.stopping.__all__``; an option group such as
``updates=Updates(...)`` contributes one parameter per field, named ``updates.<field>`` and set through the group, in
every class that takes it). :data:`TRIALS` gives, for each parameter, one or more trials: a non-default value, the
other arguments it is built with (empty: all defaults; otherwise an enabling context) and what must happen:

* ``acts``: the run differs from the same run without the value (the output, the extras, the model's state after
  the stage, the number of forward calls, or the files written);
* ``refused``: a ``ValueError`` or ``TypeError`` naming the argument, at construction or before the first forward.

A discovered parameter without a trial fails the test, so a new argument cannot go unchecked. The first trial of a
parameter is built with every other argument at its default, except for EATA and SAR, whose entropy filters keep no
sample of this small, unsure model at their defaults (so nothing would be trained): their ``acts`` trials take
lenient filters. A prerequisite such as ``policy="mix"`` for ``NormStatistics(alpha=...)`` gets a trial in its
enabling context beside the refusal in the default one. The runs are tiny (12 images of 3x6x6, a 4-channel conv net,
3 batches) through ``Trainer.predict`` for callbacks and the plain-module path for the rest.
"""

import copy
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from ttt_models import trainer

import ttc_lightning as ttc
from ttc_lightning import stopping
from ttc_lightning.ttt.anchoring import WeightEnsemble
from ttc_lightning.ttt.correction import OutputCorrection

SGD = functools.partial(torch.optim.SGD, lr=0.5)
STEP_LR = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.01)
#: A warm-up: sets the first update's rate when built, so it acts even when each optimizer takes one update.
WARMUP = functools.partial(torch.optim.lr_scheduler.LinearLR, start_factor=0.01, total_iters=10)
DIR = "@DIR@"  # replaced by each run's own folder
CLASSES = 3
#: The option groups, by the parameter name the classes take them under.
GROUPS: dict[str, type] = {"updates": ttc.Updates, "resets": ttc.Resets, "persistence": ttc.Persistence}


class Saved:
    """A value standing for a state file saved by a run of the same class and context (for ``resume_from``)."""

    def __repr__(self) -> str:
        return "Saved()"


SAVED = Saved()


@dataclass(frozen=True)
class ProbeNet:
    """A value standing for the run's model (of the probe's kind) with weights from ``seed``, in eval mode."""

    seed: int = 0


def parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The arguments of ``cls``: its signature's, with an option group's fields (``updates.clip_grad``, ...) spelt
    out."""
    found: dict[str, inspect.Parameter] = {}
    signature = inspect.signature(cls.__init__) if cls.__init__ is not object.__init__ else inspect.Signature()
    for name, parameter in signature.parameters.items():
        if name == "self" or parameter.kind is parameter.VAR_POSITIONAL:
            continue
        if parameter.kind is parameter.VAR_KEYWORD:
            raise AssertionError(f"{cls.__name__} takes **{name}: spell out what it accepts in parameters()")
        elif isinstance(parameter.default, tuple(GROUPS.values())):
            for option in dataclasses.fields(parameter.default):
                dotted = f"{name}.{option.name}"
                found[dotted] = inspect.Parameter(option.name, parameter.KEYWORD_ONLY, default=option.default)
        else:
            found[name] = parameter
    return found


def fold(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the dotted options built into their groups (``updates.tol=1`` -> ``updates=Updates(tol=1)``)."""
    plain = {k: v for k, v in kwargs.items() if "." not in k}
    grouped: dict[str, dict[str, Any]] = {}
    for key, value in kwargs.items():
        if "." in key:
            group, option = key.split(".", 1)
            grouped.setdefault(group, {})[option] = value
    return {**plain, **{group: GROUPS[group](**options) for group, options in grouped.items()}}


# --- Models and data -----------------------------------------------------------------------------------------------


class Net(ttc.TestTimeComputeMixin, L.LightningModule):
    """conv 3->4, BatchNorm (non-trivial statistics), ReLU, Dropout, then a head: ``classifier`` (B, 3) logits,
    ``dense`` (B, 3, H, W) logits, ``points`` (B, 3, 2) coordinates; ``nodropout`` is the classifier without dropout,
    ``nangrad`` the classifier with non-finite gradients on an image whose first pixel is 0, ``groupnorm`` the
    classifier with GroupNorm instead of BatchNorm.
    Counts forward calls; ``ttc_init``/``ttc_refine`` refine ``state <- head(x) + state / 2``."""

    def __init__(self, kind: str = "classifier", seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            norm = nn.GroupNorm(2, 4) if kind == "groupnorm" else nn.BatchNorm2d(4)
            body: list[nn.Module] = [nn.Conv2d(3, 4, 3, padding=1), norm, nn.ReLU()]
            if kind != "nodropout":
                body.append(nn.Dropout(0.3))
            if kind == "dense":
                head: list[nn.Module] = [nn.Conv2d(4, CLASSES, 1)]
            else:
                head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6 if kind == "points" else CLASSES)]
            self.net = nn.Sequential(*body, *head)
            with torch.no_grad():
                if isinstance(norm, nn.BatchNorm2d):
                    norm.running_mean.uniform_(-0.5, 0.5)
                    norm.running_var.uniform_(0.5, 2)
                norm.weight.uniform_(0.5, 1.5)
                self.net[-1].weight.mul_(3)
        self.kind, self.calls = kind, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y = self.net(x)
        if self.kind == "nangrad":  # adds 0, but the gradient of the BatchNorm weight is NaN where a pixel is 0
            y = y + 0 * (x[:, :1, 0, 0] * self.net[1].weight[:1]).abs().sqrt()
        return y.unflatten(1, (3, 2)) * 3 + 3 if self.kind == "points" else y

    def ttc_init(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), CLASSES)

    def ttc_refine(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(x) + state / 2
        return out, out


def images(mark: str = "") -> torch.Tensor:
    """12 images 3x6x6; ``mark="nan"`` puts a NaN, ``"zero"`` an exact 0 in one pixel of the second batch."""
    x = torch.randn(12, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    if mark:
        x[5, 0, 0, 0] = math.nan if mark == "nan" else 0.0
    return x


@dataclass(frozen=True)
class Probe:
    """What a run is made of besides the class's arguments: the model, the data, the number of dataloaders."""

    model: str = "classifier"
    mark: str = ""
    loaders: int = 1


# --- Trials --------------------------------------------------------------------------------------------------------


@dataclass
class Trial:
    """Build the class with ``context`` and ``name=value``; the run must ``expect`` ("acts" or "refused")."""

    expect: str
    value: Any
    context: dict[str, Any] = field(default_factory=dict)
    probe: Probe = Probe()
    #: Context entries the reference run goes without (those that need the value, e.g. save_path).
    without: tuple[str, ...] = ()


def acts(value: Any, probe: Probe = Probe(), without: tuple[str, ...] = (), **context: Any) -> Trial:
    return Trial("acts", value, context, probe, without)


def refused(value: Any, probe: Probe = Probe(), **context: Any) -> Trial:
    return Trial("refused", value, context, probe)


def neg_logsumexp(y: torch.Tensor) -> torch.Tensor:
    """A custom objective."""
    return -y.logsumexp(1).mean()


class Halve(OutputCorrection):
    """A custom output correction."""

    def __call__(self, prediction: torch.Tensor) -> torch.Tensor:
        return prediction / 2


SEG, POINTS, NAN, TWO_LOADERS = Probe("dense"), Probe("points"), Probe(mark="nan"), Probe(loaders=2)
#: Non-finite gradients (with a finite loss) on the second batch, which filtering presets keep in their loss.
NAN_GRADIENTS = Probe("nangrad", mark="zero")
NO_DROPOUT, GROUP_NORM = Probe("nodropout"), Probe("groupnorm")
PATH, PATH2 = f"{DIR}/state.pt", f"{DIR}/other.pt"

#: Test-time training arguments with an optimizer (the gradient presets' shared options).
GRADIENT_OPTIONS: dict[str, list[Trial]] = {
    "updates.scheduler": [acts(STEP_LR)],
    "updates.clip_grad": [acts(1e-4)],
    "updates.clip_mode": [refused("value"), acts("value", **{"updates.clip_grad": 1e-3})],
    "updates.tol": [refused(1e9), acts(1e9, steps=4)],
    "resets.every": [refused("batch"), acts("batch", steps=2), acts("batch", **{"persistence.keep_adapted": True})],
    "resets.on_collapse": [acts(1e9)],
    "resets.on_nonfinite": [acts(True, NAN)],
    "persistence.keep_adapted": [acts(True)],
    "persistence.save_every_n_batches": [
        refused(1),
        acts(1, without=("persistence.save_path",), **{"persistence.save_path": PATH}),
    ],
    "persistence.save_path": [
        refused(PATH),
        acts(PATH2, **{"persistence.save_every_n_batches": 1, "persistence.save_path": PATH}),
    ],
    "persistence.resume_from": [acts(SAVED)],
    "updates.sync": [refused(True)],  # one process: refused at the start of the stage
    "flags": [acts(True)],
    "stages": [acts(("test",))],
}
EPISODIC = {  # the same options on an episodic preset (reset before every batch) with one step per batch
    "updates.scheduler": [acts(WARMUP), acts(STEP_LR, episodic=False)],
    "resets.every": [refused(2), acts(2, episodic=False)],
    "resets.on_collapse": [refused(1e9), acts(1e9, episodic=False)],
    "resets.on_nonfinite": [refused(True, NAN), acts(True, NAN, episodic=False)],
}
#: A preset with ``episodic``: a reset rule of its own is refused beside episodic=True.
EPISODIC_RESETS = [*GRADIENT_OPTIONS["resets.every"], refused(2, episodic=True), acts(2, steps=2)]


def shared(cls: type, table: dict[str, list[Trial]]) -> dict[tuple[type, str], list[Trial]]:
    """The trials of ``table`` for the shared options of preset ``cls``."""
    return {(cls, name): trials for name, trials in table.items() if name in parameters(cls)}


#: EATA on this model: its filters must let samples through for the options of the update to act.
LENIENT = {"e_margin": 2.0, "d_margin": 1.0}


def lenient(table: dict[tuple[type, str], list[Trial]], **filters: Any) -> dict[tuple[type, str], list[Trial]]:
    """``table`` with the filter settings added to the context of its ``acts`` trials (on this small, unsure model
    the default entropy filters of EATA and SAR keep no sample, so nothing would be trained), and non-finite
    gradients instead of inputs for ``reset_on_nonfinite`` (their filters drop non-finite samples)."""
    out = {}
    for key, trials in table.items():
        out[key] = [
            acts(t.value, NAN_GRADIENTS if t.probe == NAN else t.probe, t.without, **{**filters, **t.context})
            if t.expect == "acts"
            else t
            for t in trials
        ]
    return out


AUGMENTATION: dict[str, list[Trial]] = {
    "transforms": [acts("vflip")],
    "merge": [acts("max")],
    "task": [acts("segmentation", SEG)],
    "space": [acts("prob")],
    "activation": [refused("sigmoid"), acts("sigmoid", space="prob")],
    "uncertainty": [acts(True)],
    "chunk_size": [acts(None), refused(None, stop=stopping.Confidence(0.0))],
    "stop": [acts(stopping.Confidence(0.0)), refused(stopping.Confidence(0.0), transforms="identity")],
    "min_views": [refused(2), acts(2, transforms="d4", stop=stopping.Confidence(0.0))],
    "anytime": [refused(True), acts(True, transforms="d4", stop=stopping.Confidence(0.99))],
    "return_views": [refused(True), acts(True, stop=stopping.Confidence(0.0))],
    "stages": [acts(("test",))],
}

TRIALS: dict[tuple[type, str], list[Trial]] = {
    **{(ttc.TestTimeAugmentation, name): trials for name, trials in AUGMENTATION.items()},
    **{(ttc.Augmenter, name): trials for name, trials in AUGMENTATION.items() if name != "stages"},
    **{(ttc.TTAWrapper, name): trials for name, trials in AUGMENTATION.items() if name != "stages"},
    (ttc.TTAWrapper, "model"): [acts(ProbeNet(seed=1))],
    # Task options, run through an Augmenter over the views of the context's ``transforms`` (default hflip).
    (ttc.tta.Classification, "flip_classes"): [acts([(0, 1)]), refused([(0, 1)], transforms="rot90")],
    (ttc.tta.Segmentation, "flip_classes"): [acts([(0, 1)], SEG), refused([(0, 1)], SEG, transforms="rot90")],
    (ttc.tta.Keypoints, "flip_pairs"): [acts([(0, 1)], POINTS), refused([(0, 1)], POINTS, transforms="rot90")],
    (ttc.TestTimeCallback, "stages"): [acts(("test",))],
    # Test-time training, statistics only by default.
    **{
        (ttc.TestTimeTraining, name): trials
        for name, trials in {
            "optimizer": [acts(SGD)],
            "objective": [refused(neg_logsumexp), acts(neg_logsumexp, optimizer=SGD)],
            "params": [refused("all"), acts("all", optimizer=SGD)],
            "norm": [
                acts("mix"),
                refused("source"),
                acts("source", optimizer=SGD),
                refused("ema", GROUP_NORM, optimizer=SGD),
                acts(ttc.NormStatistics("mix", alpha=0.9)),
                refused(ttc.NormStatistics("mix", alpha=0.9), GROUP_NORM, optimizer=SGD),
            ],
            "steps": [refused(3), acts(3, optimizer=SGD)],
            "updates.scheduler": [
                refused(STEP_LR),
                acts(STEP_LR, optimizer=SGD),
                acts(WARMUP, optimizer=SGD, **{"resets.every": 1, "persistence.keep_adapted": True}),
            ],
            "updates.clip_grad": [refused(1e-4), acts(1e-4, optimizer=SGD)],
            "updates.clip_mode": [
                refused("value"),
                refused("value", optimizer=SGD),
                acts("value", optimizer=SGD, **{"updates.clip_grad": 1e-3}),
            ],
            "updates.tol": [refused(1e9), refused(1e9, optimizer=SGD, steps=2), acts(1e9, optimizer=SGD, steps=4)],
            "resets.every": [
                refused("batch"),
                refused("batch", optimizer=SGD),  # one step per batch: every prediction is the source model's
                acts("batch", optimizer=SGD, steps=2),
                acts("batch", norm="ema"),
                refused(2, norm="ema"),
                refused("dataloader", optimizer=SGD),
                acts("dataloader", TWO_LOADERS, optimizer=SGD),
            ],
            "resets.on_collapse": [
                refused(1e9),
                acts(1e9, optimizer=SGD),
                refused(1e9, optimizer=SGD, **{"resets.every": "batch"}),
            ],
            "resets.on_nonfinite": [refused(True), acts(True, NAN, optimizer=SGD)],
            "persistence.keep_adapted": [refused(True), acts(True, optimizer=SGD), acts(True, norm="ema")],
            "persistence.save_every_n_batches": [
                refused(1, **{"persistence.save_path": PATH}),
                acts(1, without=("persistence.save_path",), optimizer=SGD, **{"persistence.save_path": PATH}),
            ],
            "persistence.save_path": [
                refused(PATH),
                acts(PATH2, optimizer=SGD, **{"persistence.save_every_n_batches": 1, "persistence.save_path": PATH}),
            ],
            "persistence.resume_from": [refused(SAVED), acts(SAVED, optimizer=SGD), acts(SAVED, norm="ema")],
            "updates.sync": [refused(True), refused(True, optimizer=SGD)],
            "anchors": [refused([WeightEnsemble(0.5)]), acts([WeightEnsemble(0.5)], optimizer=SGD)],
            "correction": [acts(Halve()), acts(Halve(), optimizer=SGD)],
            "flags": [refused(True), acts(True, optimizer=SGD)],
            "stages": [acts(("test",))],
        }.items()
    },
    # The statistics policy's weights, through TestTimeTraining(norm=NormStatistics(...)).
    (ttc.NormStatistics, "policy"): [acts("mix"), acts("source", optimizer=SGD)],
    (ttc.NormStatistics, "alpha"): [refused(0.9), acts(0.9, policy="mix")],
    (ttc.NormStatistics, "momentum"): [refused(0.5), acts(0.5, policy="ema")],
    # BatchNormAdapt: statistics only; its running statistics carry over only with norm="ema".
    **{
        (ttc.BatchNormAdapt, name): trials
        for name, trials in {
            "norm": [acts("mix")],
            "alpha": [refused(0.9), acts(0.9, norm="mix")],
            "momentum": [refused(0.5), acts(0.5, norm="ema")],
            "persistence.keep_adapted": [refused(True), acts(True, norm="ema")],
            "resets.every": [refused("batch"), acts("batch", norm="ema"), refused(2, norm="ema")],
            "resets.on_collapse": [refused(1e9), refused(1e9, norm="ema")],
            "resets.on_nonfinite": [refused(True), refused(True, norm="ema")],
            "persistence.save_every_n_batches": [
                refused(1, **{"persistence.save_path": PATH}),
                acts(1, without=("persistence.save_path",), norm="ema", **{"persistence.save_path": PATH}),
            ],
            "persistence.save_path": [
                refused(PATH),
                acts(PATH2, norm="ema", **{"persistence.save_every_n_batches": 1, "persistence.save_path": PATH}),
            ],
            "persistence.resume_from": [refused(SAVED), acts(SAVED, norm="ema")],
            "stages": [acts(("test",))],
        }.items()
    },
    **shared(ttc.Tent, GRADIENT_OPTIONS),
    (ttc.Tent, "resets.every"): EPISODIC_RESETS,
    (ttc.Tent, "optimizer"): [acts(SGD)],
    (ttc.Tent, "steps"): [acts(2)],
    (ttc.Tent, "episodic"): [refused(True), acts(True, steps=2), acts(True, **{"persistence.keep_adapted": True})],
    (ttc.Tent, "params"): [acts("all")],
    **lenient(shared(ttc.EATA, GRADIENT_OPTIONS), **LENIENT),
    **lenient({(ttc.EATA, "resets.every"): EPISODIC_RESETS}, **LENIENT),
    (ttc.EATA, "optimizer"): [acts(SGD, **LENIENT)],
    (ttc.EATA, "e_margin"): [acts(2.0)],
    (ttc.EATA, "d_margin"): [
        acts(1.0, e_margin=2.0),
        refused(1.0, episodic=True, **{"persistence.keep_adapted": True}),
    ],
    (ttc.EATA, "fisher_data"): [acts([images()[:4]], **LENIENT)],
    (ttc.EATA, "fisher_alpha"): [refused(1.0), acts(1.0, fisher_data=[images()[:4]], **LENIENT)],
    (ttc.EATA, "steps"): [acts(2, **LENIENT)],
    (ttc.EATA, "episodic"): [refused(True), acts(True, steps=2, **LENIENT)],
    (ttc.EATA, "params"): [acts("all", **LENIENT)],
    **lenient(shared(ttc.SAR, GRADIENT_OPTIONS), e_margin=2.0),
    (ttc.SAR, "resets.on_collapse"): [refused(1e9), refused(1e9, episodic=True)],  # reset_below sets it
    **lenient(
        {
            (ttc.SAR, "optimizer"): [acts(SGD)],
            (ttc.SAR, "rho"): [acts(5.0)],
            (ttc.SAR, "reset_below"): [acts(1e9), refused(1e9, episodic=True), refused(1e9, **{"resets.every": 1})],
            (ttc.SAR, "steps"): [acts(2)],
            (ttc.SAR, "episodic"): [refused(True), acts(True, steps=2)],
            (ttc.SAR, "params"): [acts("all")],
        },
        e_margin=2.0,
    ),
    (ttc.SAR, "e_margin"): [acts(2.0)],
    **shared(ttc.MEMO, {**GRADIENT_OPTIONS, **EPISODIC}),
    (ttc.MEMO, "optimizer"): [acts(SGD)],
    (ttc.MEMO, "views"): [acts(2), refused(2, transforms="hflip")],
    (ttc.MEMO, "augment"): [acts(ttc.RandomAugment(seed=1)), refused(ttc.RandomAugment(seed=1), transforms="hflip")],
    (ttc.MEMO, "transforms"): [acts("hflip")],
    (ttc.MEMO, "alpha"): [acts(0.1), refused(0.1, GROUP_NORM)],
    (ttc.MEMO, "steps"): [acts(2)],
    (ttc.MEMO, "episodic"): [acts(False)],
    (ttc.MEMO, "params"): [acts("batchnorm")],
    **shared(ttc.CoTTA, GRADIENT_OPTIONS),
    (ttc.CoTTA, "optimizer"): [acts(SGD)],
    (ttc.CoTTA, "ema"): [acts(0.5), refused(1.0), acts(1.0, **{"persistence.keep_adapted": True})],
    (ttc.CoTTA, "restore_prob"): [acts(0.5)],
    (ttc.CoTTA, "anchor_threshold"): [acts(0.0)],
    (ttc.CoTTA, "views"): [acts(2), refused(2, anchor_threshold=0.0)],
    (ttc.CoTTA, "augment"): [
        acts(ttc.RandomAugment(seed=1)),
        refused(ttc.RandomAugment(seed=1), anchor_threshold=0.0, restore_prob=0.0),
    ],
    (ttc.CoTTA, "params"): [acts("batchnorm")],
    (ttc.CoTTA, "steps"): [acts(2)],
    # Iterative inference (sampling with dropout by default).
    **{
        (ttc.IterativeInference, name): trials
        for name, trials in {
            "mode": [acts("refine")],
            "stop": [acts(stopping.Confidence(0.0)), refused(stopping.Confidence(0.0), max_iters=1)],
            "max_iters": [acts(3)],
            "min_iters": [refused(2), acts(2, stop=stopping.Confidence(0.0))],
            "space": [acts("raw"), refused("raw", mode="refine")],
            "augment": [acts(ttc.RandomAugment()), refused(ttc.RandomAugment(), mode="refine")],
            "warm_start": [refused(True), acts(True, mode="refine")],
            "anytime": [refused(True), acts(True, stop=stopping.Confidence(0.99))],
            "return_iterations": [acts(True)],
            "seed": [acts(1), refused(1, mode="refine"), refused(1, NO_DROPOUT, augment=ttc.RandomAugment())],
            "stages": [acts(("test",))],
        }.items()
    },
    # The writer: its files are the observation.
    (ttc.PredictionWriter, "path"): [acts(f"{DIR}/q.pt")],
    (ttc.PredictionWriter, "shard_size"): [acts(5), refused(5, merge=False)],
    (ttc.PredictionWriter, "merge"): [acts(False)],
    # Transforms, through TTAWrapper on the classifier.
    (ttc.Rotate90, "ks"): [acts([0, 2])],
    (ttc.Scale, "scales"): [acts([1.0, 0.5])],
    (ttc.Scale, "interpolation"): [acts("nearest"), refused("nearest", scales=[1.0])],
    (ttc.Resize, "sizes"): [acts([(3, 5)])],
    (ttc.Resize, "interpolation"): [acts("nearest"), refused("nearest", sizes=[])],
    (ttc.Add, "values"): [acts([0.0, 0.5])],
    (ttc.Multiply, "factors"): [acts([1.0, 2.0])],
    (ttc.FiveCrop, "size"): [acts(0.5)],
    (ttc.Transform, "params"): [acts((0, 1))],
    (ttc.RandomAugment, "severity"): [acts(0.5)],
    (ttc.RandomAugment, "width"): [acts(1)],
    (ttc.RandomAugment, "depth"): [acts(1)],
    (ttc.RandomAugment, "alpha"): [acts(0.5)],
    (ttc.RandomAugment, "seed"): [acts(1)],
    # Stopping rules, through adaptive TTA over the d4 views.
    (stopping.Confidence, "threshold"): [acts(0.0)],
    (stopping.Margin, "threshold"): [acts(0.0)],
    (stopping.Entropy, "threshold"): [acts(10.0)],
    (stopping.Stable, "patience"): [acts(1)],
    (stopping.Converged, "tol"): [acts(1e9)],
    (stopping.BetaVote, "confidence"): [acts(0.0)],
    (stopping.WindowAgreement, "window"): [acts(1)],
    (stopping.AnyOf, "rules"): [acts([stopping.Confidence(0.0)])],
    (stopping.AllOf, "rules"): [acts([stopping.Confidence(0.0)])],
}


class Roll(ttc.Transform):
    """A concrete transform for the base class's ``params``: rolls the image by ``param`` pixels."""

    def augment(self, x: torch.Tensor, param: int) -> torch.Tensor:
        return x.roll(param, dims=-1)


#: Values of the arguments that have no default (the baseline's), and how to build abstract classes.
REQUIRED: dict[tuple[type, str], Any] = {
    (ttc.TTAWrapper, "model"): ProbeNet(),
    (ttc.PredictionWriter, "path"): f"{DIR}/p.pt",
    (ttc.Resize, "sizes"): [(4, 4)],
    (ttc.Transform, "params"): (0,),
    (stopping.AnyOf, "rules"): [stopping.Confidence(0.9)],
    (stopping.AllOf, "rules"): [stopping.Confidence(0.9)],
}
TASKS = (ttc.tta.Classification, ttc.tta.Segmentation, ttc.tta.Keypoints, ttc.tta.Boxes)


def on_views(task: type) -> Callable[..., ttc.Augmenter]:
    """Builds ``task`` with its options into an Augmenter over ``transforms`` (the probe of a task's options)."""
    return lambda transforms="hflip", **options: ttc.Augmenter(transforms, task=task(**options))


#: The model a class's baseline runs on, where it is not the classifier.
PROBES = {ttc.tta.Segmentation: SEG, ttc.tta.Keypoints: POINTS}
BUILDERS: dict[type, Callable[..., Any]] = {
    ttc.TestTimeCallback: ttc.TestTimeAugmentation,
    ttc.Transform: Roll,
    ttc.NormStatistics: lambda optimizer=None, **k: ttc.TestTimeTraining(optimizer, norm=ttc.NormStatistics(**k)),
    **{task: on_views(task) for task in TASKS},
}
#: Public classes that users do not configure, with the reason.
RECORDS = {
    stopping.Trace: "the halting loop builds it for the rules to read",
    stopping.StoppingRule: "abstract, without arguments",
    ttc.TestTimeComputeMixin: "a mixin without arguments",
    **{group: "an option group: its fields are tried in every class that takes it" for group in GROUPS.values()},
    ttc.tta.View: "built by expand_views from a transform spec",
}


# --- Discovery -----------------------------------------------------------------------------------------------------


def public_classes() -> list[type]:
    objects = [getattr(module, n) for module in (ttc, ttc.tta, stopping) for n in module.__all__]
    return list(dict.fromkeys(obj for obj in objects if inspect.isclass(obj)))


CASES = [(cls, name) for cls in public_classes() if cls not in RECORDS for name in parameters(cls)]


def test_every_discovered_argument_has_a_trial():
    missing = [f"{cls.__name__}.{name}" for cls, name in CASES if (cls, name) not in TRIALS]
    assert not missing, f"arguments without a non-default value to try in TRIALS: {missing}"
    unknown = [f"{cls.__name__}.{name}" for cls, name in TRIALS if (cls, name) not in CASES]
    assert not unknown, f"TRIALS for arguments that do not exist: {unknown}"
    assert {ttc.Tent, ttc.TestTimeAugmentation, stopping.Confidence, ttc.PredictionWriter} <= {c for c, _ in CASES}


def test_every_trial_uses_a_non_default_value():
    for cls, name in CASES:
        default = parameters(cls)[name].default
        for trial in TRIALS.get((cls, name), []):
            baseline = trial.context.get(name, REQUIRED.get((cls, name), default))
            assert not _same_value(trial.value, baseline), f"{cls.__name__}.{name}={trial.value!r} is the baseline's"


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, nn.Module) or isinstance(b, nn.Module):
        return a is b
    try:
        return bool(a == b) and type(a) is type(b)
    except (RuntimeError, TypeError):
        return a is b


# --- Runs ----------------------------------------------------------------------------------------------------------


class Refusal(Exception):
    """A run refused its arguments (construction, or the start of the stage before any forward)."""


@dataclass
class Observation:
    outputs: list[tuple[str, torch.Tensor]]
    state: dict[str, torch.Tensor]
    calls: int
    files: list[str]


def _flatten(value: Any, where: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        return [(where, value.detach())]
    if isinstance(value, dict):
        return [item for key in value for item in _flatten(value[key], f"{where}[{key!r}]")]
    if isinstance(value, list | tuple):
        return [item for i, v in enumerate(value) for item in _flatten(v, f"{where}[{i}]")]
    if value is None:
        return [(where, torch.zeros(0))]
    raise AssertionError(f"unexpected {type(value).__name__} in a run's output")


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)))
    return torch.equal(a, b)


def _same(a: list[tuple[str, torch.Tensor]], b: list[tuple[str, torch.Tensor]]) -> bool:
    return [k for k, _ in a] == [k for k, _ in b] and all(_equal(x, y) for (_, x), (_, y) in zip(a, b, strict=True))


def differs(a: Observation, b: Observation) -> list[str]:
    """What differs between two runs."""
    what = []
    if not _same(a.outputs, b.outputs):
        what.append("output")
    if not _same(sorted(a.state.items()), sorted(b.state.items())):
        what.append("model state")
    if a.calls != b.calls:
        what.append("forward calls")
    if a.files != b.files:
        what.append("files")
    return what


def _resolve(value: Any, folder: Path, probe: Probe) -> Any:
    if isinstance(value, str) and value.startswith(DIR):
        return str(folder) + value[len(DIR) :]
    if isinstance(value, ProbeNet):
        return Net(probe.model, value.seed).eval()
    return value


def _files(folder: Path) -> list[str]:
    """The files a run wrote (state files, predictions, shards, part files), by name."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and "lightning" not in p.parts)


def loaders(probe: Probe) -> Any:
    data = DataLoader(TensorDataset(images(probe.mark)), batch_size=4)
    return [data, copy.deepcopy(data)] if probe.loaders == 2 else data


CALLBACKS = (ttc.TestTimeCallback, ttc.PredictionWriter)


def observe(cls: type, kwargs: dict[str, Any], probe: Probe, folder: Path) -> Observation:
    """Build ``cls`` with ``kwargs`` and run it; raise :class:`Refusal` for a refusal."""
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {k: _resolve(v, folder, probe) for k, v in kwargs.items()}
    if any(isinstance(v, Saved) for v in kwargs.values()):
        kwargs = {
            k: (_saved_state(cls, kwargs, probe, folder) if isinstance(v, Saved) else v) for k, v in kwargs.items()
        }
    build = BUILDERS.get(cls, cls)
    try:
        built = build(**fold(kwargs))
    except (ValueError, TypeError) as error:
        raise Refusal(str(error)) from error
    model = Net(probe.model)
    if isinstance(built, CALLBACKS):
        try:
            outputs = trainer([built], default_root_dir=folder / "lightning").predict(model, loaders(probe))
        except (ValueError, TypeError) as error:
            if model.calls:
                raise
            raise Refusal(str(error)) from error
        files = _files(folder)
        return Observation(_flatten(outputs), dict(model.state_dict()), model.calls, files)
    with torch.no_grad():
        model.eval()
        x = images()[:4]
        if cls is ttc.TTAWrapper:
            outputs, calls = built(x), built.model.calls
        elif cls is ttc.Augmenter or cls in TASKS:
            outputs = built(model, x)
            calls = model.calls
        elif issubclass(cls, ttc.Transform):
            wrapper = ttc.TTAWrapper(model, transforms=built)
            outputs, calls = wrapper(x), model.calls
        elif cls is ttc.RandomAugment:
            outputs, calls = built(x), 0
        elif issubclass(cls, stopping.StoppingRule):
            outputs = ttc.TTAWrapper(model, transforms="d4", stop=built, return_views=True)(x)
            calls = model.calls
        else:
            raise AssertionError(f"no probe for {cls.__name__}")
    return Observation(_flatten(outputs), {}, calls, [])


def _saved_state(cls: type, kwargs: dict[str, Any], probe: Probe, folder: Path) -> str:
    """A state file written by a run of ``cls`` with the other arguments (a missing file if they refuse saving)."""
    others = {k: v for k, v in kwargs.items() if not isinstance(v, Saved)}
    path = folder.parent / f"{folder.name}-saved" / "state.pt"
    saves = {"persistence.save_every_n_batches": 1, "persistence.save_path": str(path)}
    try:
        saving = BUILDERS.get(cls, cls)(**fold({**others, **saves}))
    except (ValueError, TypeError):
        return str(folder / "missing.pt")
    trainer([saving]).predict(Net(probe.model), loaders(probe))
    return str(path)


def baseline_kwargs(cls: type, context: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for (c, k), v in REQUIRED.items() if c is cls}, **context}


@pytest.mark.parametrize(("cls", "name"), CASES, ids=[f"{c.__name__}.{n}" for c, n in CASES])
def test_an_argument_changes_behaviour_or_is_refused_by_name(cls, name, tmp_path):
    trials = TRIALS.get((cls, name))
    assert trials, f"{cls.__name__}.{name} has no trial"
    for index, trial in enumerate(trials):
        where = f"{cls.__name__}({name}={trial.value!r}) with {trial.context or 'defaults'}"
        base = baseline_kwargs(cls, trial.context)
        try:
            got = observe(cls, {**base, name: trial.value}, trial.probe, tmp_path / f"{index}" / "trial")
        except Refusal as refusal:
            assert trial.expect == "refused", f"{where} was refused but should act: {refusal}"
            assert name in str(refusal), f"{where} was refused without naming `{name}`: {refusal}"
            continue
        assert trial.expect == "acts", f"{where} was accepted but should be refused by name"
        reference_kwargs = {k: v for k, v in base.items() if k not in trial.without}
        reference = observe(cls, reference_kwargs, trial.probe, tmp_path / f"{index}" / "baseline")
        assert differs(got, reference), f"{where} changed nothing (output, state, forward calls, files)"


@pytest.mark.parametrize("cls", sorted({c for c, _ in CASES}, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_the_baseline_runs_are_deterministic(cls, tmp_path):
    """Two runs with the same arguments are the same, so that a difference is the argument's doing."""
    base, probe = baseline_kwargs(cls, {}), PROBES.get(cls, Probe())
    first = observe(cls, base, probe, tmp_path / "a")
    second = observe(cls, base, probe, tmp_path / "b")
    assert not differs(first, second)


def test_sar_skips_and_counts_a_batch_with_non_finite_gradients():
    """SAR used to perturb every parameter by a NaN step direction and then find no reliable sample, so the batch
    went uncounted and `reset_on_nonfinite` could never act; now the batch is skipped and counted."""
    sar = ttc.SAR(optimizer=SGD, e_margin=2.0)
    model = Net("nangrad")
    with pytest.warns(UserWarning, match="non-finite gradients"):
        outputs = trainer([sar]).predict(model, loaders(NAN_GRADIENTS))
    assert (sar.skipped, sar.updates) == (1, 2)
    assert all(torch.isfinite(o).all() for o in outputs)
