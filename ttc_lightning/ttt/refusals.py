"""Refusals of test-time training arguments that cannot act given the others (or, at the start of a stage, given the
run): each by name, with why it has no effect and what would make it act. A value equal to the default is never
refused. Options that only depend on their own group are checked by the group itself (:class:`~.updater.Updates`,
:class:`~.resets.Resets`, :class:`~.persistence.Persistence`, :class:`~.norm.NormStatistics`)."""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ttc_lightning.checks import check_unused, moved_keywords
from ttc_lightning.pipeline import Run
from ttc_lightning.ttt.anchoring import Anchor
from ttc_lightning.ttt.correction import OutputCorrection
from ttc_lightning.ttt.norm import NormStatistics, running_statistics
from ttc_lightning.ttt.persistence import Persistence
from ttc_lightning.ttt.resets import Resets
from ttc_lightning.ttt.sync import distributed
from ttc_lightning.ttt.updater import Updates

if TYPE_CHECKING:
    from ttc_lightning.ttt.base import TestTimeTraining

#: Keywords of test-time training that moved into an option group (CHANGELOG.md), and how to pass them now.
MOVED = {
    "scheduler": "updates=ttc.Updates(scheduler=...)",
    "clip_grad": "updates=ttc.Updates(clip_grad=...)",
    "clip_mode": "updates=ttc.Updates(clip_mode=...)",
    "tol": "updates=ttc.Updates(tol=...)",
    "sync": "updates=ttc.Updates(sync=...)",
    "reset": "resets=ttc.Resets(every=...)",
    "reset_on_collapse": "resets=ttc.Resets(on_collapse=...)",
    "reset_on_nonfinite": "resets=ttc.Resets(on_nonfinite=...)",
    "keep_adapted": "persistence=ttc.Persistence(keep_adapted=...)",
    "save_every_n_batches": "persistence=ttc.Persistence(save_every_n_batches=...)",
    "save_path": "persistence=ttc.Persistence(save_path=...)",
    "resume_from": "persistence=ttc.Persistence(resume_from=...)",
    "norm_alpha": 'norm=ttc.NormStatistics("mix", alpha=...)',
    "norm_momentum": 'norm=ttc.NormStatistics("ema", momentum=...)',
}
#: Decorates the ``__init__`` of test-time training and its presets: a moved keyword says where it went.
refuse_moved = moved_keywords(MOVED, "a new argument")
#: What the stage's dataloaders are counted by, per Trainer stage.
LOADERS = {"predict": "num_predict_batches", "test": "num_test_batches", "validate": "num_val_batches"}


def check_parts(*, updates: Any, resets: Any, persistence: Any, anchors: Sequence[Any], correction: Any) -> None:
    """Refuse option groups and parts of the wrong kind (``correction`` may be ``None``).

    Raises:
        TypeError: naming the argument and the type it must have.
    """
    kinds = {"updates": Updates, "resets": Resets, "persistence": Persistence, "correction": OutputCorrection}
    given = {"updates": updates, "resets": resets, "persistence": persistence, "correction": correction}
    for name, value in given.items():
        if value is not None and not isinstance(value, kinds[name]):
            raise TypeError(f"`{name}`={value!r} must be a ttc_lightning.{kinds[name].__name__}.")
    if isinstance(anchors, str | Anchor) or not all(isinstance(a, Anchor) for a in anchors):
        raise TypeError(f"`anchors`={anchors!r} must be a list of ttc_lightning.ttt.anchoring.Anchor parts.")


def check_without_optimizer(
    objective: Any, params: Any, steps: int, updates: Updates, resets: Resets, anchors: Sequence[Any], flags: bool
) -> None:
    """Refuse the gradient options given without an ``optimizer`` (nothing is trained then).

    Raises:
        ValueError: naming every such option given other than its default.
    """
    options = {
        "objective": objective != "entropy",
        "params": params != "batchnorm",
        "steps": steps != 1,
        **{name: name in updates.given() for name in _names("updates", Updates)},
        "resets.on_collapse": resets.on_collapse is not None,
        "resets.on_nonfinite": resets.on_nonfinite,
        "anchors": len(anchors) > 0,
        "flags": flags,
    }
    unused = [f"`{name}`" for name, given in options.items() if given]
    if unused:
        raise ValueError(
            f"{', '.join(unused)} set without an `optimizer`: nothing is trained then (only the BatchNorm "
            f"statistics adapt), so {', '.join(options)} are unused. Pass an `optimizer` or drop them."
        )


def _names(prefix: str, group: type) -> list[str]:
    return [f"{prefix}.{name}" for name in group.__dataclass_fields__]


def check_combinations(
    *, trains: bool, norm: NormStatistics, steps: int, updates: Updates, resets: Resets, persistence: Persistence
) -> None:
    """Refuse the options that cannot act given options of other groups (``trains``: an optimizer was given).

    Raises:
        ValueError: naming the first such option, with why and a remedy.
    """
    if steps < 3:
        why = (
            "it ends a batch's steps when the loss changed by less than tol between two steps, which can first "
            f"spare a step after the second one, and steps={steps}"
        )
        check_unused("updates.tol", updates.tol, None, why, "Use steps >= 3 or drop it")
    if trains:
        return
    if norm.policy == "source":
        why = "without an `optimizer` nothing is trained, and the source statistics are what the model uses anyway"
        check_unused("norm", norm.policy, "batch", why, "Use norm 'batch', 'mix' or 'ema', or pass an `optimizer`")
    if isinstance(resets.every, int):
        why = "every=N counts optimizer updates, and without an `optimizer` there are none"
        remedy = "Use every='batch' or 'dataloader', or pass an `optimizer`"
        check_unused("resets.every", resets.every, "never", why, remedy)
    if norm.policy != "ema":
        why = (
            f"without an `optimizer` and with norm={norm.policy!r} the model never changes (the statistics are "
            "computed per batch and never stored), so there is nothing to keep, reset, save or resume"
        )
        remedy = "Use norm='ema' (running statistics that carry over from batch to batch) or pass an `optimizer`"
        check_unused("persistence.keep_adapted", persistence.keep_adapted, False, why, remedy)
        check_unused("resets.every", resets.every, "never", why, remedy)
        check_unused("persistence.save_every_n_batches", persistence.save_every_n_batches, None, why, remedy)
        check_unused("persistence.resume_from", persistence.resume_from, None, why, remedy)


def check_composition(tt: "TestTimeTraining", composed: bool) -> None:
    """Refuse an episodic single update of ``tt`` whose prediction would never see it (``composed``: a strategy runs
    inside it, whose forward then gives the prediction).

    Raises:
        ValueError: naming ``resets.every`` (``episodic``), with why and a remedy.
    """
    every = tt.resetter.options.every
    one_update = tt.updater is not None and tt.steps == 1 and every in ("batch", 1)
    if one_update and tt.predicts_before_update and not composed and not tt.persistence.keep_adapted:
        raise ValueError(
            f"`resets.every`={every!r} (`episodic`=True in a preset) with steps=1 leaves the `optimizer` without "
            f"effect: {type(tt).__name__} predicts each batch from its forward before the batch's only update, and "
            "the model is reset to the source before every batch, so no update ever reaches a prediction (they are "
            "the source model's). Use steps >= 2, compose a strategy that predicts with the adapted model "
            "(TestTimeAugmentation), persistence=Persistence(keep_adapted=True) to keep the last batch's adaptation, "
            "or ttc.BatchNormAdapt."
        )


def check_run(tt: "TestTimeTraining", run: Run) -> None:
    """Refuse, at the start of the stage, the arguments of ``tt`` that the run leaves without effect.

    Raises:
        ValueError: naming the argument, with why and a remedy.
    """
    if tt.updater is not None and tt.updater.options.sync and not distributed():
        raise ValueError(
            "`updates.sync`=True has no effect: it keeps the processes of a multi-process run in step, and this run "
            "has one process. Run on several devices (e.g. strategy='ddp') or drop it."
        )
    module = run.module
    if tt.norm_arguments and not running_statistics(module) and tt.updater is not None:
        given = ", ".join(f"`{name}`={value!r}" for name, value in tt.norm_arguments.items())
        raise ValueError(
            f"{given} has no effect: the statistics policy acts on BatchNorm layers with running statistics, and "
            f"{type(module).__name__} has none. Drop it, or use a model with BatchNorm."
        )
    trainer, stage = run.trainer, run.stage
    if tt.resetter.options.every == "dataloader" and trainer is not None:
        loaders = len(getattr(trainer, LOADERS[stage])) if stage in LOADERS else 0
        if loaders == 1:
            raise ValueError(
                f"`resets.every`='dataloader' has no effect: it resets when a new {stage} dataloader starts, and this "
                "run has one. Pass several dataloaders, or use every='batch' or 'never'."
            )
