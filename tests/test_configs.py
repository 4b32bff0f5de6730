"""Every Hydra config under configs/ composes and instantiates to the documented strategy."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf.errors import ConfigKeyError
from schemas import register

import ttc_lightning as ttc

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TTA_VIEWS = {"hflip": 2, "flip": 4, "d4": 8, "multiscale": 3, "five_crop": 5, "ten_crop": 10}
TTT = {
    "bn": (ttc.BatchNormAdapt, None),
    "tent": (ttc.Tent, torch.optim.Adam),
    "eata": (ttc.EATA, torch.optim.SGD),
    "sar": (ttc.SAR, torch.optim.SGD),
    "memo": (ttc.MEMO, torch.optim.SGD),
    "cotta": (ttc.CoTTA, torch.optim.Adam),
}


def _compose(*overrides: str):
    register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(overrides=list(overrides))


def test_every_tta_config_is_checked():
    names = {p.stem for p in (CONFIGS / "ttc" / "tta").glob("*.yaml")}
    assert names == set(TTA_VIEWS) | {"none", "adaptive_d4", "shift_multiscale"}


def test_shift_multiscale_config():
    import digits  # noqa: F401  (registers the "shift" transform)

    assert len(instantiate(_compose("+ttc/tta=shift_multiscale").ttc.tta).augmenter) == 15


def test_adaptive_tta_config():
    callback = instantiate(_compose("+ttc/tta=adaptive_d4").ttc.tta)
    assert len(callback.augmenter) == 8
    assert repr(callback.augmenter.stop) == "Confidence(0.95)"


@pytest.mark.parametrize("name", sorted(TTA_VIEWS))
def test_tta_config_instantiates(name):
    callback = instantiate(_compose(f"+ttc/tta={name}").ttc.tta)
    assert isinstance(callback, ttc.TestTimeAugmentation)
    assert len(callback.augmenter) == TTA_VIEWS[name]
    assert callback.augmenter.merge == "mean"


def test_tta_none_is_empty():
    assert _compose("+ttc/tta=none").ttc.tta == {}


def test_every_ttt_config_is_checked():
    assert {p.stem for p in (CONFIGS / "ttc" / "ttt").glob("*.yaml")} == set(TTT) | {"none"}


@pytest.mark.parametrize("name", sorted(TTT))
def test_ttt_config_instantiates_with_a_working_optimizer_factory(name):
    cls, optimizer = TTT[name]
    callback = instantiate(_compose(f"+ttc/ttt={name}").ttc.ttt)
    assert type(callback) is cls
    if optimizer is None:
        assert callback.optimizer_factory is None
    else:
        assert isinstance(callback.optimizer_factory([torch.nn.Parameter(torch.zeros(1))]), optimizer)


def test_ttt_none_is_empty():
    assert _compose("+ttc/ttt=none").ttc.ttt == {}


ITERATIVE = {
    "mc_dropout": ("sample", "AnyOf([BetaVote(0.95), Confidence(0.99)])", 16),
    "refine": ("refine", "Converged(0.0001)", 100),
}


def test_every_iterative_config_is_checked():
    assert {p.stem for p in (CONFIGS / "ttc" / "iterative").glob("*.yaml")} == set(ITERATIVE) | {"none"}


@pytest.mark.parametrize("name", sorted(ITERATIVE))
def test_iterative_config_instantiates(name):
    mode, rule, max_iters = ITERATIVE[name]
    callback = instantiate(_compose(f"+ttc/iterative={name}").ttc.iterative)
    assert isinstance(callback, ttc.IterativeInference)
    assert (callback.mode, repr(callback.stop), callback.max_iters) == (mode, rule, max_iters)


def test_iterative_none_is_empty():
    assert _compose("+ttc/iterative=none").ttc.iterative == {}


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["+ttc/ttt=tent", "ttc.ttt.episodc=true"], "episodc"),
        (["+ttc/ttt=eata", "ttc.ttt.keep_adpated=true"], "keep_adpated"),
        (["+ttc/ttt=eata", "ttc.ttt.persistence.keep_adpated=true"], "keep_adpated"),
        (["+ttc/ttt=tent", "ttc.ttt.keep_adapted=true"], "keep_adapted"),  # moved to persistence
        (["+ttc/tta=d4", "ttc.tta.merg=max"], "merg"),
        (["+ttc/iterative=refine", "ttc.iterative.max_iter=5"], "max_iter"),
    ],
)
def test_a_misspelt_argument_on_the_command_line_fails_at_composition(overrides, key):
    with pytest.raises(ConfigCompositionException, match=key):
        _compose(*overrides)


def test_a_misspelt_argument_in_a_users_config_file_fails_at_composition(tmp_path):
    (tmp_path / "ttc" / "ttt").mkdir(parents=True)
    (tmp_path / "ttc" / "ttt" / "my_tent.yaml").write_text("defaults:\n  - tent_schema\n  - _self_\nstpes: 3\n")
    register()
    with (
        initialize_config_dir(config_dir=str(tmp_path), version_base=None),
        pytest.raises((ConfigCompositionException, ConfigKeyError), match="stpes"),
    ):
        compose(overrides=["+ttc/ttt=my_tent"])


def test_schemas_accept_grouped_options_and_other_optimizers():
    cfg = _compose(
        "+ttc/ttt=tent",
        "ttc.ttt.persistence.keep_adapted=true",
        "ttc.ttt.updates.clip_grad=0.5",
        "ttc.ttt.optimizer._target_=torch.optim.SGD",
        "+ttc.ttt.optimizer.momentum=0.5",
    )
    tent = instantiate(cfg.ttc.ttt)
    assert tent.persistence == ttc.Persistence(keep_adapted=True) and tent.updater.options.clip_grad == 0.5
    optimizer = tent.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.5
