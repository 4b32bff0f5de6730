"""Presets accept exactly the shared TestTimeTraining options they use, and name the ones they set themselves or
leave without effect (with the reason)."""

import inspect
import re

import pytest

import ttc_lightning as ttc

PRESETS = [ttc.BatchNormAdapt, ttc.Tent, ttc.EATA, ttc.SAR, ttc.MEMO, ttc.CoTTA]
BASE = [n for n in inspect.signature(ttc.TestTimeTraining.__init__).parameters if n != "self"]
#: The options a statistics-only preset can use (everything else needs gradient steps).
STATISTICS_OPTIONS = {"keep_adapted", "reset", "save_every_n_batches", "save_path", "resume_from", "stages"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda c: c.__name__)
def test_every_base_argument_is_own_shared_fixed_or_unused(preset):
    own = set(inspect.signature(preset.__init__).parameters)
    shared, fixed, unused = set(preset.shared_options()), set(preset.fixed_options), set(preset.unused_options)
    assert not shared & fixed and not shared & unused and not fixed & unused
    assert set(BASE) <= own | shared | fixed | unused
    if preset.requires_optimizer:
        assert {"keep_adapted", "stages", "sync", "save_path", "flags", "clip_mode"} <= shared
    else:
        assert shared == STATISTICS_OPTIONS


@pytest.mark.parametrize("preset", PRESETS, ids=lambda c: c.__name__)
def test_fixed_and_unused_options_are_refused_with_a_clear_error(preset):
    accepted = ", ".join(preset.shared_options())
    for name in (*preset.fixed_options, *preset.unused_options):
        with pytest.raises(TypeError, match=f"{preset.__name__} got unexpected option.*'{name}'") as caught:
            preset(**{name: "not the default"})
        message = str(caught.value)
        assert f"itself and accepts its own arguments plus {accepted}." in message
        if name in preset.unused_options:
            assert f"`{name}` has no effect in {preset.__name__}: {preset.unused_options[name]}." in message


@pytest.mark.parametrize("preset", PRESETS, ids=lambda c: c.__name__)
def test_the_message_lists_exactly_the_options_that_are_accepted(preset):
    """Every option the message lists is accepted at its default, and every other base option is refused."""
    defaults = inspect.signature(ttc.TestTimeTraining.__init__).parameters
    with pytest.raises(TypeError) as caught:
        preset(misspelt=1)
    listed = re.search(r"accepts its own arguments plus (.*)\.$", str(caught.value)).group(1).split(", ")
    assert listed == list(preset.shared_options())
    for name in BASE:
        if name in listed or name in preset.unused_options:  # an option without effect passes at its default
            preset(**{name: defaults[name].default})
        elif name in preset.fixed_options:
            with pytest.raises(TypeError, match=f"'{name}'"):
                preset(**{name: defaults[name].default})


@pytest.mark.parametrize("preset", PRESETS, ids=lambda c: c.__name__)
def test_shared_options_at_their_defaults_are_accepted(preset):
    defaults = inspect.signature(ttc.TestTimeTraining.__init__).parameters
    preset(**{name: defaults[name].default for name in preset.shared_options()})


def test_a_misspelt_option_is_refused():
    with pytest.raises(TypeError, match="'keep_adpated'"):
        ttc.Tent(keep_adpated=True)
