"""Multi-process predict never aborts (issue 10, part 3).

A gloo worker thread marks a collective complete before it drops its own reference to the collective's tensors, so
``dist.broadcast`` / ``dist.all_reduce`` can return while that thread still holds them; their Python objects are then
freed on that thread, which must take the GIL, and a thread still waiting for the GIL when the interpreter shuts down
is ended with ``pthread_exit``, which can abort the process (``terminate called without an active exception``).
ttc's collectives therefore return only once the process group has let go of their tensors
(:func:`ttc_lightning.ttt.sync.settle`).

Fast tests: a one-rank process group that completes every collective at once and, like a gloo worker, keeps a C++
reference to its tensors for a while after (:class:`LateRelease`); when a ttc hook or collective returns, the group
must hold none of them. Slow test: the two-predict DDP pattern of the issue (tests/ddp_two_predicts.py), 30 launches
in a row, each one's files equal to one process's predictions.
"""

import datetime
import functools
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from ddp_two_predicts import BATCH, SAMPLES, ConvNet, inputs, launch, loader
from torch._C._distributed_c10d import _create_work_from_future
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.dlpack import to_dlpack

import ttc_lightning as ttc
from ttc_lightning.ttt.sync import average_gradients, status

BACKEND = "ttc_late_release"
DELAY_S = 0.3


def _from_ttc() -> bool:
    """Whether the collective being issued comes from ttc_lightning's code (not Lightning's own broadcasts)."""
    frame = sys._getframe()
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("ttc_lightning"):
            return True
        frame = frame.f_back
    return False


class LateRelease(dist.ProcessGroup):
    """One rank; each collective completes at once, and the group keeps a C++ reference to its tensors ``DELAY_S``
    longer (DLPack capsules, dropped by a timer thread), as a gloo worker thread may. ``held()``: how many of ttc's
    collectives it still holds."""

    def __init__(self, rank: int, size: int) -> None:
        super().__init__(rank, size)
        self.holders: list[tuple[list, bool]] = []
        self.collectives = 0  # issued by ttc

    def held(self) -> int:
        return sum(from_ttc for _, from_ttc in list(self.holders))

    def _late(self, tensors: list[torch.Tensor]) -> dist.Work:
        from_ttc = _from_ttc()
        self.collectives += from_ttc
        entry = ([to_dlpack(tensor) for tensor in tensors], from_ttc)
        self.holders.append(entry)
        threading.Timer(DELAY_S, self.holders.remove, [entry]).start()
        done = torch.futures.Future()
        done.set_result(list(tensors))
        return _create_work_from_future(done)

    def broadcast(self, tensor_list: list[torch.Tensor], opts: object = None) -> dist.Work:
        return self._late(tensor_list)

    def allreduce(self, tensor_list: list[torch.Tensor], opts: object = None) -> dist.Work:
        return self._late(tensor_list)

    def barrier(self, opts: object = None) -> dist.Work:
        done = torch.futures.Future()
        done.set_result(None)
        return _create_work_from_future(done)


def _create(store: dist.Store, rank: int, size: int, timeout: datetime.timedelta) -> LateRelease:
    group = LateRelease(rank, size)
    CREATED.append(group)
    return group


CREATED: list[LateRelease] = []


@pytest.fixture
def late_group() -> Iterator[LateRelease]:
    """A default process group of :class:`LateRelease`; the environment and thread count Lightning's DDP setup
    changes are restored afterwards."""
    if BACKEND not in dist.Backend.backend_list:
        dist.Backend.register_backend(BACKEND, _create, devices=["cpu"])
    environ, threads = dict(os.environ), torch.get_num_threads()
    dist.init_process_group(BACKEND, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield CREATED[-1]
    finally:
        dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)


class Probe(L.Callback):
    """After the writer's hooks (callbacks run in list order): record how many collectives the group still holds."""

    def __init__(self, group: LateRelease) -> None:
        self.group = group
        self.seen: dict[str, tuple[int, int]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.seen["setup"] = (self.group.collectives, self.group.held())

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.seen["teardown"] = (self.group.collectives, self.group.held())


def test_writer_returns_only_once_the_process_group_let_go_of_its_tensors(
    late_group: LateRelease, tmp_path: Path
) -> None:
    probe = Probe(late_group)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy="ddp",
        callbacks=[ttc.TestTimeAugmentation("hflip"), ttc.PredictionWriter(tmp_path / "p.pt"), probe],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.predict(ConvNet(), loader(), return_predictions=False)
    # the writer broadcast its run id in setup and the merge outcome in teardown (size and payload each), and the
    # group held none of those tensors any more when each hook returned
    assert probe.seen == {"setup": (2, 0), "teardown": (4, 0)}
    assert torch.load(tmp_path / "p.pt").shape == (SAMPLES, 5)


def test_sync_rounds_return_only_once_released(late_group: LateRelease) -> None:
    x = torch.randn(3, 2, 4)
    assert status(True, x, torch.device("cpu")) == (1, (2, 4))
    assert late_group.held() == 0
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 2.0)
    assert average_gradients([param], weight=3.0, value=0.5, bad=False) == (0.5, False)
    assert late_group.held() == 0
    torch.testing.assert_close(param.grad, torch.full((3,), 2.0))
    assert late_group.collectives == 2


def test_broadcast_object_returns_rank_zeros_object_once_released(late_group: LateRelease) -> None:
    from ttc_lightning.ttt.sync import broadcast_object

    assert broadcast_object({"run": "abc", "n": 3}) == {"run": "abc", "n": 3}
    assert late_group.held() == 0
    assert late_group.collectives == 2  # size, then payload


def one_process() -> dict[str, torch.Tensor]:
    """What every launch of the pattern must write, computed on one process: the TTA predict over the whole dataset
    (eval-mode BatchNorm: batch-independent), episodic Tent per rank's shard (rank r predicts samples r, r + 2, ...
    in batches of 5, and Tent adapts on each batch's statistics), interleaved back into dataset order."""

    def predict(strategies: list[L.Callback], x: torch.Tensor) -> torch.Tensor:
        trainer = L.Trainer(
            accelerator="cpu", callbacks=strategies, logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        return torch.cat(trainer.predict(ConvNet(), DataLoader(TensorDataset(x), batch_size=BATCH)))

    x = inputs()
    tta = ttc.TestTimeAugmentation("d4")
    tent = ttc.Tent(optimizer=functools.partial(torch.optim.SGD, lr=0.01), episodic=True)
    adapted = torch.empty(SAMPLES, 5)
    for rank in (0, 1):
        adapted[rank::2] = predict([tent, tta], x[rank::2])
    return {"tta": predict([tta], x), "tent": adapted}


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 30 launches; seconds_per_run_mean in benchmarks/results/ddp_two_predicts.json
def test_two_ddp_predicts_in_a_row_thirty_times() -> None:
    """Each launch exits 0 without an abort, and writes what one process predicts (Tent is episodic: per batch)."""
    expected = one_process()
    for run in range(30):
        with tempfile.TemporaryDirectory() as out:
            done = launch(out, control=False)
            assert done is not None, f"launch {run} timed out"
            assert done.returncode == 0 and "terminate called" not in done.stderr, (run, done.stderr[-3000:])
            for name, reference in expected.items():
                torch.testing.assert_close(torch.load(Path(out) / f"{name}.pt"), reference, atol=1e-5, rtol=1e-5)
