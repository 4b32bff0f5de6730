"""Presets are explicit compositions: their signatures list exactly the options they use (their own, the shared
keywords and the grouped option objects), with no ``**options`` pass-through, and document each."""

import inspect

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
def test_a_misspelt_or_moved_option_is_refused(preset):
    for name in ("keep_adpated", "keep_adapted", "save_every_n_batches", "clip_grad"):
        with pytest.raises(TypeError, match=f"'{name}'"):
            preset(**{name: True})


@pytest.mark.parametrize("preset", PRESETS, ids=lambda c: c.__name__)
def test_options_at_their_defaults_are_accepted(preset):
    preset(**{n: p.default for n, p in inspect.signature(preset.__init__).parameters.items() if n != "self"})
