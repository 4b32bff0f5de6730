"""The parts of the adaptation core on their own: updater, reset policy, anchors, output correction, persistence."""

import functools
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from ttt_models import ConvNet, images, trainer

import ttc_lightning as ttc
from ttc_lightning.ttt.anchoring import EMATeacher, StochasticRestore, WeightEnsemble, swapped
from ttc_lightning.ttt.correction import OutputCorrection
from ttc_lightning.ttt.objectives import Loss
from ttc_lightning.ttt.persistence import check_state
from ttc_lightning.ttt.resets import ResetPolicy
from ttc_lightning.ttt.updater import Updater

SGD = functools.partial(torch.optim.SGD, lr=0.5)


def parameters(*values: float) -> list[nn.Parameter]:
    return [nn.Parameter(torch.tensor([v, 2 * v])) for v in values]


# Updater --------------------------------------------------------------------------------------------------------------


def test_the_updater_takes_an_sgd_step_and_counts_it():
    params = parameters(1.0)
    updater = Updater(SGD, ttc.Updates(), "Test")
    updater.start(params, None, synced=False)
    value = updater.backward(Loss((params[0] ** 2).sum()), batch_size=4)
    assert value == 5.0 and updater.step(value)
    torch.testing.assert_close(params[0].detach(), torch.tensor([0.0, 0.0]))  # p - 0.5 * 2p
    assert (updater.updates, updater.backwards, updater.skipped) == (1, 1, 0)


def test_the_updater_skips_non_finite_losses_and_gradients_and_an_empty_filter():
    params = parameters(1.0)
    updater = Updater(SGD, ttc.Updates(), "Test")
    updater.start(params, None, synced=False)
    with pytest.warns(UserWarning, match="Test: non-finite loss"):
        assert updater.backward(Loss(params[0].sum() * math.nan), 4) is None
    assert updater.backward(Loss(params[0].sum(), torch.zeros(4, dtype=torch.bool)), 4) is None  # nothing kept
    value = updater.backward(Loss(params[0][0] * 1.0), 4)
    params[0].grad = torch.tensor([math.nan, 0.0])  # a finite loss with a non-finite gradient
    assert not updater.step(value)
    torch.testing.assert_close(params[0].detach(), torch.tensor([1.0, 2.0]))
    assert (updater.updates, updater.skipped) == (0, 2)


def test_clipping_by_value_bounds_every_component():
    params = parameters(1.0)
    updater = Updater(SGD, ttc.Updates(clip_grad=0.1, clip_mode="value"), "Test")
    updater.start(params, None, synced=False)
    assert updater.step(updater.backward(Loss((100 * params[0]).sum()), 1))
    torch.testing.assert_close(params[0].detach(), torch.tensor([0.95, 1.95]))


def test_the_scheduler_is_rebuilt_with_every_optimizer():
    scheduler = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.1)
    updater = Updater(SGD, ttc.Updates(scheduler=scheduler), "Test")
    updater.start(parameters(1.0), None, synced=False)
    first = updater.optimizer
    updater.renew()
    assert updater.optimizer is not first and updater.scheduler.optimizer is updater.optimizer


# Reset policy ---------------------------------------------------------------------------------------------------------


def test_the_reset_policy_decides_each_rule():
    every_two = ResetPolicy(ttc.Resets(every=2))
    every_two.updated(1.0)
    assert not every_two.due(0)
    every_two.updated(1.0)
    assert every_two.due(0)
    loaders = ResetPolicy(ttc.Resets(every="dataloader"))
    assert [loaders.due(i) for i in (0, 0, 1, 1)] == [False, False, True, False]
    collapse = ResetPolicy(ttc.Resets(on_collapse=0.5))
    collapse.updated(1.0)
    collapse.updated(0.0)  # average 0.9 * 1.0 + 0.1 * 0.0
    assert collapse.loss_average == pytest.approx(0.9) and not collapse.due(0)
    nonfinite = ResetPolicy(ttc.Resets(on_nonfinite=True))
    nonfinite.nonfinite()
    assert nonfinite.due(0)
    nonfinite.restart()
    assert not nonfinite.due(0)


# Anchors --------------------------------------------------------------------------------------------------------------


def test_weight_ensembling_follows_its_formula():
    params = parameters(1.0, -3.0)
    ensemble = WeightEnsemble(0.75)
    ensemble.start(params)
    source = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(4.0)
    adapted = [p.detach().clone() for p in params]
    ensemble.after_update(params)
    for p, theta, theta0 in zip(params, adapted, source, strict=True):
        torch.testing.assert_close(p.detach(), 0.75 * theta + 0.25 * theta0, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"`alpha`=1.5"):
        WeightEnsemble(1.5)
    with pytest.raises(ValueError, match=r"`alpha`=1 has no effect"):
        WeightEnsemble(1.0)


def test_the_ema_teacher_follows_its_formula_and_swaps_in():
    params = parameters(2.0)
    teacher = EMATeacher(0.9)
    teacher.start(params)
    with torch.no_grad():
        params[0].add_(10.0)
    teacher.after_update(params)
    torch.testing.assert_close(teacher.values[0], 0.9 * torch.tensor([2.0, 4.0]) + 0.1 * torch.tensor([12.0, 14.0]))
    with swapped(params, teacher.values):
        assert torch.equal(params[0].detach(), teacher.values[0])
    torch.testing.assert_close(params[0].detach(), torch.tensor([12.0, 14.0]))


def test_stochastic_restore_returns_every_element_with_probability_one_and_none_with_zero():
    params = parameters(1.0)
    for prob, expected in ((1.0, [1.0, 2.0]), (0.0, [6.0, 7.0])):
        restore = StochasticRestore(prob, seed=3)
        restore.start(params)
        with torch.no_grad():
            params[0].add_(5.0)
        restore.after_update(params)
        torch.testing.assert_close(params[0].detach(), torch.tensor(expected))
        with torch.no_grad():
            params[0].copy_(torch.tensor([1.0, 2.0]))


def test_an_anchor_composes_into_the_base_class():
    """Weight ensembling with alpha=0 puts the source back after every update: predictions equal the source's."""
    x = images(n=16)
    data = DataLoader(TensorDataset(x), batch_size=8)
    plain = torch.cat(trainer([ttc.BatchNormAdapt()]).predict(ConvNet(), data))
    anchored = ttc.TestTimeTraining(optimizer=SGD, steps=2, anchors=[WeightEnsemble(0.0)])
    torch.testing.assert_close(torch.cat(trainer([anchored]).predict(ConvNet(), data)), plain, rtol=0, atol=0)
    assert anchored.updates == 4


# Output correction and persistence ------------------------------------------------------------------------------------


class Halve(OutputCorrection):
    def __call__(self, prediction):
        return prediction / 2


def test_the_output_correction_acts_on_the_prediction_and_the_identity_is_the_default():
    data = DataLoader(TensorDataset(images(n=8)), batch_size=8)
    plain = torch.cat(trainer([ttc.Tent(optimizer=SGD)]).predict(ConvNet(), data))
    corrected = ttc.TestTimeTraining(optimizer=SGD, correction=Halve())
    torch.testing.assert_close(torch.cat(trainer([corrected]).predict(ConvNet(), data)), plain / 2, rtol=0, atol=0)


def test_a_checkpoint_gets_no_adaptation_state_and_a_foreign_state_is_refused():
    tent = ttc.Tent(optimizer=SGD)
    assert tent.state_dict() == {} and tent.adaptation_state() == {}
    with pytest.raises(ValueError, match="saved by Tent, not EATA"):
        check_state({"preset": "Tent"}, "EATA")
    with pytest.raises(ValueError, match="not an adaptation state"):
        check_state({"weights": 1}, "Tent")
