"""Strategies on 2 CPU processes (DDP over gloo) against one process: TTA and refinement give the same predictions;
sampling and episodic adaptation act per rank, each rank equal to one process over that rank's samples."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_strategies import BATCH, CONFIGS, inputs
from torch.utils.data import DataLoader, TensorDataset
from ttt_models import trainer


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = Path(__file__).parent / "ddp_strategies.py"
    done = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: torch.load(out / f"{name}.pt") for name in CONFIGS}


def one_process(name: str, x: torch.Tensor, seed_offset: int = 0):
    """The configuration on one process over ``x``, concatenated like the writer's file."""
    make_model, make_callbacks = CONFIGS[name]
    callbacks = make_callbacks()
    for callback in callbacks:
        if hasattr(callback, "seed"):
            callback.seed += seed_offset  # what rank ``seed_offset`` uses
    out = trainer(callbacks).predict(make_model(), DataLoader(TensorDataset(x), batch_size=BATCH))
    if isinstance(out[0], dict):
        return {k: torch.cat([o[k] for o in out]) for k in out[0]}
    return torch.cat(out)


def interleave(parts: list, total: int):
    """Rank outputs (rank r holds samples r, r + 2, ...) back in dataset order."""
    if isinstance(parts[0], dict):
        return {k: interleave([p[k] for p in parts], total) for k in parts[0]}
    out = parts[0].new_empty((total, *parts[0].shape[1:]))
    for r, part in enumerate(parts):
        out[r::2] = part
    return out


def assert_close(got, expected):
    if isinstance(expected, dict):
        assert got.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tta", "tta_adaptive", "refine"])
def test_two_processes_predict_what_one_process_predicts(written, name):
    expected = one_process(name, inputs())
    assert_close(written[name], expected)
    if name != "tta":  # per-sample counts vary, so halting really happened per rank
        counts = expected["views" if name == "tta_adaptive" else "iterations"]
        assert len(set(counts.tolist())) > 1


@pytest.mark.parametrize("name", ["sample", "tent_episodic"])
def test_sampling_and_episodic_adaptation_act_per_rank(written, name):
    """Each rank equals one process over its own samples (sampling seeds with ``seed + rank``)."""
    x = inputs()
    ranks = [one_process(name, x[r::2], seed_offset=r if name == "sample" else 0) for r in (0, 1)]
    assert_close(written[name], interleave(ranks, len(x)))
