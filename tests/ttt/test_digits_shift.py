"""A small real shift: a CNN trained on digits, tested on corrupted copies; BN-adapt and Tent beat the source model
by a clear margin, and Tent is within about a point of BN-adapt (as in TENT's CIFAR-10-C table)."""

import functools

import pytest
import torch
import torch.nn.functional as F
from digits import digits, predict, quiet, train

import ttc_lightning as ttc

CORRUPTIONS = {
    "low_contrast": lambda x: 0.4 * x + 0.3,
    "blur": lambda x: F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1),
}


@pytest.fixture(scope="module")
def model():
    quiet()
    return train(epochs=10)


def error(model, images, labels, callbacks):
    return (predict(model, images, callbacks).argmax(1) != labels).float().mean().item() * 100


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_bn_adapt_and_tent_beat_the_source_model(model, corruption):
    _, _, x_test, y_test = digits()
    shifted = CORRUPTIONS[corruption](x_test)
    source = error(model, shifted, y_test, [])
    bn = error(model, shifted, y_test, [ttc.BatchNormAdapt()])
    tent = error(model, shifted, y_test, [ttc.Tent(optimizer=functools.partial(torch.optim.Adam, lr=1e-3))])
    assert error(model, x_test, y_test, []) < 3  # the source model is good on clean data
    assert source > bn + 20 and source > tent + 20, (source, bn, tent)
    assert tent < bn + 1.5, (bn, tent)
