"""Synchronized adaptation across 2 CPU processes (DDP over gloo), uneven batch counts: no hang, identical ranks,
and Tent equal to a single-process reference that averages the ranks' gradients by sample."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_sync import BATCH, PRESETS, SGD, Net, inputs


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync") / "result"
    script = Path(__file__).parents[1] / "ddp_sync.py"
    done = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in (0, 1)]


def entropy(logits):
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def reference_tent():
    """Rounds of one update each: the loss is the mean entropy over both ranks' batches of the round (each batch
    normalised with its own statistics), so the gradient is the sample-weighted average of the ranks' gradients."""
    model = Net().net.eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.train()
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    model.requires_grad_(False)
    params = [model[1].weight, model[1].bias]
    for p in params:
        p.requires_grad_(True)
    optimizer = SGD(params)
    x = inputs()
    shards = [x[r::2].split(BATCH) for r in (0, 1)]
    predictions = [[], []]
    for t in range(max(len(s) for s in shards)):
        outputs = {r: model(shards[r][t]) for r in (0, 1) if t < len(shards[r])}
        total = sum(len(o) for o in outputs.values())
        loss = sum(entropy(o).sum() for o in outputs.values()) / total
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for r, o in outputs.items():
            predictions[r].append(o.detach())
    return predictions, params


def test_ranks_run_uneven_batch_counts(ranks):
    assert [ranks[r]["tent"]["batches"] for r in (0, 1)] == [3, 2]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_synchronized_ranks_stay_identical(ranks, name):
    first, second = ranks[0][name], ranks[1][name]
    assert first["updates"] == second["updates"] > 0
    for key, value in first["state"].items():
        assert torch.equal(value, second["state"][key]), key


def test_tent_matches_the_sample_weighted_reference(ranks):
    predictions, params = reference_tent()
    for r in (0, 1):
        got = ranks[r]["tent"]["predictions"]
        assert len(got) == len(predictions[r])
        for mine, theirs in zip(got, predictions[r], strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    state = ranks[0]["tent"]["state"]
    torch.testing.assert_close(state["net.1.weight"], params[0].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["net.1.bias"], params[1].detach(), rtol=1e-5, atol=1e-6)
