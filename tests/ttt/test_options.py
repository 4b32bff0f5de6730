"""Presets accept exactly the shared TestTimeTraining options, and name the ones they set themselves."""

import inspect

import pytest

import ttc_lightning as ttc

PRESETS = [ttc.BatchNormAdapt, ttc.Tent, ttc.EATA, ttc.SAR, ttc.MEMO, ttc.CoTTA]
BASE = [n for n in inspect.signature(ttc.TestTimeTraining.__init__).parameters if n != "self"]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda c: c.__name__)
def test_every_base_argument_is_own_shared_or_fixed(preset):
    own = set(inspect.signature(preset.__init__).parameters)
    shared, fixed = set(preset.shared_options()), set(preset.fixed_options)
    assert not shared & fixed
    assert set(BASE) <= own | shared | fixed
    assert {"keep_adapted", "stages", "sync", "save_path"} <= shared


@pytest.mark.parametrize("preset", PRESETS, ids=lambda c: c.__name__)
def test_fixed_options_are_refused_with_a_clear_error(preset):
    for name in preset.fixed_options:
        with pytest.raises(TypeError, match=f"{preset.__name__} got unexpected option.*'{name}'"):
            preset(**{name: None})


@pytest.mark.parametrize("preset", PRESETS, ids=lambda c: c.__name__)
def test_shared_options_at_their_defaults_are_accepted(preset):
    defaults = inspect.signature(ttc.TestTimeTraining.__init__).parameters
    preset(**{name: defaults[name].default for name in preset.shared_options()})


def test_a_misspelt_option_is_refused():
    with pytest.raises(TypeError, match="'keep_adpated'"):
        ttc.Tent(keep_adpated=True)
