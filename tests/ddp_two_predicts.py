"""Two DDP predicts in a row on 2 CPU processes (gloo), the pattern of issue 10: first TestTimeAugmentation("d4")
with PredictionWriter, then episodic Tent (SGD, lr 0.01) with the same TTA and writer; 37 samples at batch size 5
(rank 0: 19 samples, rank 1: 18). Run by tests/test_ddp_exit.py; its counts are in
benchmarks/results/ddp_two_predicts.json.

Usage:
    python ddp_two_predicts.py OUT            writes OUT/tta.pt and OUT/tent.pt (ttc.PredictionWriter)
    python ddp_two_predicts.py --control OUT  the same two predicts of the plain model with no ttc callback; each
                                              rank writes OUT/{tta,tent}.rank<r>.pt (Lightning's BasePredictionWriter)
    python ddp_two_predicts.py --repeat N [--control] [--label NAME] [--json FILE]
                                              runs the pattern N times, one launch after another (each with a
                                              timeout), counts the runs that fail (exit code not 0, "terminate called"
                                              on stderr, a timeout) and prints the counts as JSON; with --json adds
                                              them under NAME to FILE (date, machine, versions, library commit).
    python ddp_two_predicts.py --held N [--json FILE]
                                              on 2 gloo processes, N all-reduces each with dist.all_reduce and N with
                                              ttc's (settling) all_reduce: how often the process group still holds the
                                              tensor when the call returns, and how long it takes to let go (label
                                              "held_after_return").
"""

import argparse
import fcntl
import functools
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ttc_lightning as ttc
from ttc_lightning.ttt import sync

SAMPLES, BATCH = 37, 5
NAMES = ("tta", "tent")
TIMEOUT = 900  # seconds per launch in --repeat (a loaded 2-core machine takes up to ~2 min)


def inputs() -> torch.Tensor:
    return torch.randn(SAMPLES, 3, 8, 8, generator=torch.Generator().manual_seed(3))


class ConvNet(ttc.TestTimeComputeMixin, L.LightningModule):
    """conv, BatchNorm (non-trivial running statistics), ReLU, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Sequential(
                nn.Conv2d(3, 6, 3),
                nn.BatchNorm2d(6),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(2),
                nn.Flatten(),
                nn.Linear(24, 5),
            )
            self.net[1].running_mean.uniform_(-0.2, 0.2)
            self.net[1].running_var.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def loader() -> DataLoader:
    return DataLoader(TensorDataset(inputs()), batch_size=BATCH)


class RankWriter(BasePredictionWriter):
    """Plain Lightning: each rank saves its predictions and their dataset indices at the end of the epoch."""

    def __init__(self, path: str) -> None:
        super().__init__(write_interval="epoch")
        self.path = path

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Sequence[torch.Tensor],
        batch_indices: Sequence[Sequence[Sequence[int]]],
    ) -> None:
        torch.save(
            {"prediction": torch.cat(predictions), "indices": torch.tensor([i for b in batch_indices[0] for i in b])},
            f"{self.path}.rank{trainer.global_rank}.pt",
        )


def predict(out: Path, control: bool) -> None:
    """The two predicts in one script (Lightning relaunches it for rank 1), as a user writes them: one model, one
    TTA callback and one writer shared by both Trainers; rank 0 moves the first file aside before the second."""
    model = ConvNet()
    tta = ttc.TestTimeAugmentation("d4")
    writer = ttc.PredictionWriter(out / "predictions.pt")
    tent = ttc.Tent(optimizer=functools.partial(torch.optim.SGD, lr=0.01), episodic=True)
    for name, strategies in (("tta", [tta]), ("tent", [tent, tta])):
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            callbacks=[RankWriter(str(out / name))] if control else [*strategies, writer],
            default_root_dir=out,  # otherwise Lightning's defaults: CSV logger, progress bar, model summary
        )
        trainer.predict(model, loader())
        if not control and trainer.is_global_zero:
            os.replace(out / "predictions.pt", out / f"{name}.pt")


def machine() -> str:
    with open("/proc/cpuinfo") as file:
        models = [line.split(":", 1)[1].strip() for line in file if line.startswith("model name")]
    return f"{models[0] if models else platform.processor()}, {os.cpu_count()} logical CPUs"


def library_commit() -> str:
    """The git commit (and whether the tree differs from it) of the ttc_lightning that this script imports."""
    root = Path(ttc.__file__).resolve().parent.parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode:
        return f"unknown ({root} is not a git checkout)"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "ttc_lightning"], cwd=root, capture_output=True, text=True
    ).stdout
    return f"{head.stdout.strip()}{' (ttc_lightning modified)' if dirty.strip() else ''}"


def launch(out: str, control: bool, timeout: float = TIMEOUT) -> subprocess.CompletedProcess | None:
    """Run the pattern once into ``out`` (both ranks in a new session, so that a timeout ends rank 1 too); ``None``
    on a timeout."""
    library = str(Path(ttc.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (library, os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, __file__, *(["--control"] if control else []), out]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def repeat(runs: int, control: bool, note: str, save: Callable[[dict], None]) -> dict:
    """Launch the pattern ``runs`` times, one after another; count the failures by kind; ``save`` the counts so far
    after every run."""
    failures: dict[str, int] = {"exit_code": 0, "terminate_called": 0, "timeout": 0}
    failed_runs: list[dict] = []
    seconds = []
    result: dict = {}
    for run in range(runs):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            done = launch(out, control)
            seconds.append(time.perf_counter() - start)
        if done is None:
            failures["timeout"] += 1
            failed_runs.append({"run": run, "kind": "timeout"})
        else:
            terminate = "terminate called" in done.stderr
            failures["terminate_called"] += terminate
            failures["exit_code"] += done.returncode != 0
            if terminate or done.returncode:
                failed_runs.append({"run": run, "returncode": done.returncode, "stderr_tail": done.stderr[-600:]})
        print(f"run {run}: {'FAILED' if failed_runs and failed_runs[-1]['run'] == run else 'ok'}", file=sys.stderr)
        result = {
            "runs": run + 1,
            "callbacks": "none (a BasePredictionWriter per rank)" if control else "ttc TTA, Tent, PredictionWriter",
            "failed": len(failed_runs),
            "failures_by_kind": failures,
            "failed_runs": failed_runs,
            "timeout_s": TIMEOUT,
            "seconds_per_run_mean": round(sum(seconds) / len(seconds), 2),
            "library": str(Path(ttc.__file__).resolve().parent),
            "library_commit": library_commit(),
            "note": note,
        }
        save(result)
    return result


def _held(rank: int, port: int, calls: int, queue) -> None:
    """One rank of ``--held``: per variant, the calls that returned while the group still held the tensor, and the
    longest wait until it let go."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    found = {}
    for variant, reduce in (("dist.all_reduce", dist.all_reduce), ("ttc_lightning all_reduce", sync.all_reduce)):
        held, longest = 0, 0.0
        for _ in range(calls):
            tensor = torch.zeros(4)
            reduce(tensor)
            if tensor._use_count() > 1:
                held += 1
                start = time.perf_counter()
                while tensor._use_count() > 1:
                    time.sleep(0)
                longest = max(longest, time.perf_counter() - start)
        found[variant] = {"held_after_return": held, "calls": calls, "longest_release_ms": round(1e3 * longest, 2)}
        dist.barrier()
    queue.put((rank, found))
    dist.destroy_process_group()


def held(calls: int) -> dict:
    """Run :func:`_held` on 2 processes; per rank and variant, the counts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=_held, args=(rank, port, calls, queue)) for rank in (0, 1)]
    for process in processes:
        process.start()
    found = dict(queue.get(timeout=TIMEOUT) for _ in processes)
    for process in processes:
        process.join()
    return {f"rank{rank}": found[rank] for rank in sorted(found)}


def record(path: Path, label: str, result: dict) -> None:
    """Add ``result`` under ``label`` to the JSON file ``path`` (locked: several series may write to it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / f"{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = json.loads(path.read_text()) if path.exists() else {"results": {}}
        saved.update(
            {
                "pattern": " ".join(__doc__.split("\n\n")[0].split()),
                "machine": machine(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "lightning": L.__version__,
            }
        )
        saved["results"][label] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **result}
        path.write_text(json.dumps(saved, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, help="output folder (not with --repeat)")
    parser.add_argument("--control", action="store_true", help="no ttc callback")
    parser.add_argument("--repeat", type=int, help="launch the pattern this many times and count the failures")
    parser.add_argument("--held", type=int, help="measure how often gloo holds an all-reduce's tensor after it returns")
    parser.add_argument("--label", default="ttc", help="name of the counts in --json")
    parser.add_argument("--json", type=Path, help="file to add the counts to")
    parser.add_argument("--note", default="", help="free text stored with the counts")
    args = parser.parse_args()
    if args.held is not None:
        found = held(args.held)
        print(json.dumps(found, indent=2))
        if args.json is not None:
            record(args.json, "held_after_return", found)
    elif args.repeat is not None:
        json_path = args.json

        def save(result: dict) -> None:
            if json_path is not None:
                record(json_path, args.label, result)

        print(json.dumps(repeat(args.repeat, args.control, args.note, save), indent=2))
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        predict(args.out, args.control)
