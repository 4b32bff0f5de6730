"""Presets are explicit compositions: their signatures list exactly the options they use (their own, the shared
keywords and the grouped option objects), with no ``**options`` pass-through, and document each."""

import inspect
import re

import pytest

import ttc_lightning as ttc

PRESETS = [ttc.BatchNormAdapt, ttc.Tent, ttc.EATA, ttc.SAR, ttc.MEMO, ttc.CoTTA]
GRADIENT = [p for p in PRESETS if p.requires_optimizer]
#: The shared options of the gradient presets, and those of the statistics-only preset.
SHARED = {"optimizer", "steps", "params", "updates", "resets", "persistence", "flags", "stages"}
STATISTICS = {"resets", "persistence", "stages"}


def names(cls: type) -> list[str]:
    return [n for n in inspect.signature(cls.__init__).parameters if n != "self"]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda c: c.__name__)
def test_no_preset_passes_options_through(preset):
    kinds = {p.kind for p in inspect.signature(preset.__init__).parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds


@pytest.mark.parametrize("preset", PRESETS, ids=lambda c: c.__name__)
def test_every_option_is_documented(preset):
    doc = inspect.getdoc(preset)
    assert all(f"\n    {name}: " in doc for name in names(preset)), [n for n in names(preset) if f"{n}:" not in doc]


def test_the_shared_machinery_is_grouped_alike_in_every_preset():
    for preset in GRADIENT:
        assert set(names(preset)) >= SHARED, preset.__name__
    assert set(names(ttc.BatchNormAdapt)) == {"norm", "alpha", "momentum"} | STATISTICS


def test_argument_counts():
    assert len(names(ttc.TestTimeTraining)) <= 12
    assert all(len(names(preset)) <= 14 for preset in PRESETS)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda c: c.__name__)
def test_a_misspelt_option_is_refused(preset):
    with pytest.raises(TypeError, match="'keep_adpated'"):
        preset(keep_adpated=True)


#: Each keyword that moved (CHANGELOG.md) and where it went: the argument and how to pass it now.
MOVED = {
    "scheduler": ("updates", "ttc.Updates(scheduler=...)"),
    "clip_grad": ("updates", "ttc.Updates(clip_grad=...)"),
    "clip_mode": ("updates", "ttc.Updates(clip_mode=...)"),
    "tol": ("updates", "ttc.Updates(tol=...)"),
    "sync": ("updates", "ttc.Updates(sync=...)"),
    "reset": ("resets", "ttc.Resets(every=...)"),
    "reset_on_collapse": ("resets", "ttc.Resets(on_collapse=...)"),
    "reset_on_nonfinite": ("resets", "ttc.Resets(on_nonfinite=...)"),
    "keep_adapted": ("persistence", "ttc.Persistence(keep_adapted=...)"),
    "save_every_n_batches": ("persistence", "ttc.Persistence(save_every_n_batches=...)"),
    "save_path": ("persistence", "ttc.Persistence(save_path=...)"),
    "resume_from": ("persistence", "ttc.Persistence(resume_from=...)"),
    "norm_alpha": ("norm", 'ttc.NormStatistics("mix", alpha=...)'),
    "norm_momentum": ("norm", 'ttc.NormStatistics("ema", momentum=...)'),
}


@pytest.mark.parametrize("cls", [ttc.TestTimeTraining, *PRESETS], ids=lambda c: c.__name__)
@pytest.mark.parametrize("old", sorted(MOVED))
def test_a_moved_keyword_says_where_it_went_where_the_class_takes_its_new_argument(cls, old):
    new, value = MOVED[old]
    if cls is ttc.SAR and old == "reset_on_collapse":  # SAR's collapse reset is its own argument
        new, value = "reset_below", "..."
    if new not in names(cls):  # nowhere to go in this class: Python's own error names the keyword
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{old}'"):
            cls(**{old: 1})
        return
    with pytest.raises(
        TypeError, match=re.escape(f"{cls.__name__}({old}=...) moved to a new argument: pass {new}={value}.")
    ):
        cls(**{old: 1})


@pytest.mark.parametrize("preset", PRESETS, ids=lambda c: c.__name__)
def test_options_at_their_defaults_are_accepted(preset):
    preset(**{n: p.default for n, p in inspect.signature(preset.__init__).parameters.items() if n != "self"})
