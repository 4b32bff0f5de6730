"""Saving and resuming online adaptation: a run interrupted after some batches and resumed from its saved state on
the rest of the stream gives the predictions of an uninterrupted run, for every preset."""

import functools

import pytest
import torch
from torch.utils.data import DataLoader, Subset, TensorDataset
from ttt_models import ConvNet, images, trainer

import ttc_lightning as ttc

SGD = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9)
PRESETS = {
    "tent": lambda **k: ttc.Tent(optimizer=SGD, **k),
    "eata": lambda **k: ttc.EATA(optimizer=SGD, e_margin=0.9, d_margin=0.5, **k),
    "sar": lambda **k: ttc.SAR(optimizer=SGD, e_margin=0.9, **k),
    "cotta": lambda **k: ttc.CoTTA(views=2, anchor_threshold=1.0, **k),
    "memo": lambda **k: ttc.MEMO(views=2, episodic=False, **k),
    "ema": lambda **k: ttc.BatchNormAdapt(norm="ema", **k),
}
DATA = TensorDataset(images(n=48))


def run(callback, data):
    model = ConvNet(scale=5.0)
    return torch.cat(trainer([callback]).predict(model, DataLoader(data, batch_size=8)))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_resumed_run_equals_the_uninterrupted_one(name, tmp_path):
    make, path = PRESETS[name], str(tmp_path / "state.pt")
    full = run(make(), DATA)
    first = run(
        make(persistence=ttc.Persistence(save_every_n_batches=2, save_path=path)), Subset(DATA, range(32))
    )  # "interrupted" after 4
    state = torch.load(path, weights_only=False)
    seen = state["counters"]["samples_seen"]
    assert seen == 32 and state["preset"] == type(make()).__name__
    rest = run(make(persistence=ttc.Persistence(resume_from=path)), Subset(DATA, range(seen, len(DATA))))
    torch.testing.assert_close(first, full[:32], rtol=0, atol=0)
    torch.testing.assert_close(rest, full[seen:], rtol=1e-6, atol=1e-6)


def test_the_state_is_saved_every_n_batches(tmp_path):
    path = str(tmp_path / "state.pt")
    run(
        ttc.Tent(optimizer=SGD, persistence=ttc.Persistence(save_every_n_batches=4, save_path=path)),
        Subset(DATA, range(40)),
    )  # 5 batches
    assert torch.load(path, weights_only=False)["counters"]["batches_seen"] == 4


def test_a_state_from_another_preset_is_refused(tmp_path):
    path = str(tmp_path / "state.pt")
    run(
        ttc.Tent(optimizer=SGD, persistence=ttc.Persistence(save_every_n_batches=1, save_path=path)),
        Subset(DATA, range(8)),
    )
    with pytest.raises(ValueError, match="saved by Tent, not EATA"):
        run(ttc.EATA(persistence=ttc.Persistence(resume_from=path)), DATA)


def test_saving_needs_a_path_and_no_state_exists_outside_a_stage():
    with pytest.raises(ValueError, match="save_path"):
        ttc.Persistence(save_every_n_batches=3)
    with pytest.raises(ValueError, match="save_every_n_batches"):
        ttc.Persistence(save_every_n_batches=0, save_path="x.pt")
    assert ttc.Tent().adaptation_state() == {}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_two_runs_with_the_same_callback_give_identical_results(name):
    callback = PRESETS[name]()
    torch.testing.assert_close(run(callback, DATA), run(callback, DATA), rtol=0, atol=0)
