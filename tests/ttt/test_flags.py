"""Per-sample flags of test-time training (``flags=True``): which samples entered the loss, which batches skipped."""

import functools
import math

import pytest
import torch
from ttt_models import LogitNet, loader, trainer

import ttc_lightning as ttc

SGD = functools.partial(torch.optim.SGD, lr=0.01)


def logits_batches():
    """Two batches of 4 logit rows over 4 classes: confident rows (low entropy) and uniform rows (entropy ln 4)."""
    confident, uniform = torch.tensor([8.0, 0, 0, 0]), torch.zeros(4)
    first = torch.stack([confident, uniform, confident, uniform])
    second = torch.stack([uniform, uniform, confident, confident])
    return torch.cat([first, second])


def test_kept_marks_the_samples_under_the_entropy_threshold():
    out = trainer([ttc.SAR(optimizer=SGD, params="all", flags=True)]).predict(LogitNet(), loader(logits_batches(), 4))
    assert [o["kept"].tolist() for o in out] == [[True, False, True, False], [False, False, True, True]]
    assert all(not o["skipped"].any() for o in out)
    torch.testing.assert_close(out[0]["prediction"], logits_batches()[:4])  # the prediction before the first update


def test_without_filters_every_sample_is_kept_and_without_flags_the_output_is_plain():
    x = logits_batches()
    out = trainer([ttc.Tent(optimizer=SGD, params="all", flags=True)]).predict(LogitNet(), loader(x, 4))
    assert all(o["kept"].all() for o in out)
    plain = trainer([ttc.Tent(optimizer=SGD, params="all")]).predict(LogitNet(), loader(x, 4))
    assert all(isinstance(o, torch.Tensor) for o in plain)


def test_skipped_flags_the_batch_with_a_non_finite_loss():
    x = logits_batches()
    x[5, 0] = math.nan
    callback = ttc.Tent(optimizer=SGD, params="all", flags=True)
    with pytest.warns(UserWarning, match="non-finite loss"):
        out = trainer([callback]).predict(LogitNet(), loader(x, 4))
    assert [o["skipped"].tolist() for o in out] == [[False] * 4, [True] * 4]
    assert callback.skipped == 1 and callback.updates == 1


@pytest.mark.parametrize("reset", [False, True])
def test_reset_on_nonfinite_resets_before_the_next_batch(reset):
    x = logits_batches()
    x = torch.cat([x, x])  # four batches; the second holds a NaN
    x[5, 0] = math.nan
    callback = ttc.Tent(optimizer=SGD, params="all", resets=ttc.Resets(on_nonfinite=reset))
    with pytest.warns(UserWarning, match="non-finite loss"):
        trainer([callback]).predict(LogitNet(), loader(x, 4))
    assert callback.skipped == 1 and callback.resets == int(reset)
