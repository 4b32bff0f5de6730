"""Shared pieces of the benchmark scripts: the model, the machine, timing, artefacts and markdown tables.

The scripts import this module as ``common`` (they put their own folder first on ``sys.path`` when run as
``python benchmarks/<script>.py``). Each script writes its measurements, with the date, the machine, the versions,
the load average and its arguments, as a JSON artefact under ``benchmarks/results/`` (:func:`save`), and prints
what its ``render`` function makes of that artefact: the tables in ``benchmarks/README.md`` are that output, and
``tests/test_docs_numbers.py`` checks that they still are.
"""

import argparse
import datetime
import itertools
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import lightning
import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import ttc_lightning as ttc

Key = TypeVar("Key", bound=Hashable)
#: Where the scripts write their artefacts.
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
Artefact = dict[str, Any]
#: When this module was imported (the scripts import it first): the start of a run's wall time.
STARTED = time.perf_counter()


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def setup_threads() -> int:
    """Set torch's intra-op threads to the usable core count, quiet Lightning's info logs, return the count."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    n = cores()
    torch.set_num_threads(n)
    return n


def load() -> list[float]:
    """The system load averages over 1, 5 and 15 minutes (empty where the system does not report them)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def add_artefact_option(parser: argparse.ArgumentParser, default: str) -> None:
    """The ``--artefact`` option: the name of the results file under ``benchmarks/results/``."""
    parser.add_argument(
        "--artefact", default=default, help=f"results file benchmarks/results/NAME.json (default: {default})"
    )


def save(
    args: argparse.Namespace, results: dict[str, Any], load_at_start: list[float], device: str = "cpu"
) -> Artefact:
    """Write ``results`` with the date, machine, versions, load average and arguments to
    ``benchmarks/results/<args.artefact>.json``; return the artefact."""
    arguments = {k: v for k, v in vars(args).items() if k != "artefact"}
    script = os.path.relpath(os.path.abspath(sys.argv[0]), os.path.dirname(os.path.dirname(RESULTS)))
    artefact: Artefact = {
        "command": " ".join([f".venv/bin/python {script}", *sys.argv[1:]]),
        "arguments": arguments,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cores": cores(),
            "torch_threads": torch.get_num_threads(),
            "device": device,
            "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "ttc_lightning": ttc.__version__,
        },
        "load_average": {"start": load_at_start, "end": load()},
        "wall_seconds": round(time.perf_counter() - STARTED, 1),
        "results": results,
    }
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{args.artefact}.json")
    with open(path, "w") as f:
        json.dump(artefact, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.relpath(path)}", file=sys.stderr)
    return artefact


def read(name: str) -> Artefact:
    """The artefact ``benchmarks/results/<name>.json``."""
    with open(os.path.join(RESULTS, f"{name}.json")) as f:
        return json.load(f)


def machine(artefact: Artefact) -> str:
    """One line naming the run's date, machine, versions and 1-minute load average at start and end."""
    m, v, loads = artefact["machine"], artefact["versions"], artefact["load_average"]
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    start, end = (f"{x[0]:.2f}" if x else "?" for x in (loads["start"], loads["end"]))
    wall = f", {artefact['wall_seconds']:.0f} s" if "wall_seconds" in artefact else ""
    return (
        f"Run of {artefact['date'][:10]}: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s)"
        f"{gpu}, torch {v['torch']}, lightning {v['lightning']}, Python {v['python']}; load average (1 min) "
        f"{start} at start, {end} at end (`{artefact['command']}`{wall})."
    )


def header(title: str, artefact: Artefact) -> str:
    """A markdown header naming the benchmark and the line of :func:`machine` (this run adds up to its thread
    count to the load; beyond that, other processes competed for the cores)."""
    return f"## {title}\n\n{machine(artefact)}\n"


def convnet(downsample: bool = True, classes: int = 10) -> nn.Sequential:
    """Three 3x3 conv blocks (32, 64, 128 channels, BatchNorm + ReLU), global average pool, linear head.

    With ``downsample`` a 2x2 max-pool follows the first two blocks (a typical small CIFAR net); without it every
    block runs at full resolution, so activations dominate memory.
    """
    layers: list[nn.Module] = []
    channels = [3, 32, 64, 128]
    for i, (cin, cout) in enumerate(itertools.pairwise(channels)):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        if downsample and i < 2:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], classes)]
    net = nn.Sequential(*layers)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode is not the identity
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return net.eval()


class LitConvNet(ttc.TestTimeComputeMixin, pl.LightningModule):
    """A LightningModule around a network, with the mixin's ``predict_step``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def trainer(callbacks: Sequence[pl.Callback] = (), device: str = "cpu") -> pl.Trainer:
    """A quiet single-device Trainer."""
    return pl.Trainer(
        accelerator="cuda" if device.startswith("cuda") else "cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=list(callbacks),
    )


def sync(device: str) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str = "cpu") -> float:
    """Seconds taken by one call of ``fn``, device work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(
    configs: dict[Key, Callable[[], object]], reps: int, device: str = "cpu"
) -> tuple[dict[Key, list[float]], dict[Key, object]]:
    """Warm every configuration up once, then time them in turn ``reps`` times, rotating the order each repetition
    (A, B, C, then B, C, A, ...) so that no configuration always follows the same one (a memory-hungry
    configuration leaves the allocator and caches in a state that helps or hurts the next).

    Returns the times of each configuration and the result of its warm-up call (for sanity checks).
    """
    warm = {name: fn() for name, fn in configs.items()}
    times: dict[Key, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            times[name].append(timed(configs[name], device))
    return times, warm


def median(values: Sequence[float]) -> float:
    """The median of ``values``."""
    return statistics.median(values)


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats are printed with 3 significant decimals."""

    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def speed_arguments(description: str, artefact: str) -> argparse.Namespace:
    """Command-line options shared by the speed benchmarks (``artefact``: the default results file name)."""
    parser = argparse.ArgumentParser(description=description)
    add_artefact_option(parser, artefact)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    return parser.parse_args()


def speed_workload(args: argparse.Namespace) -> tuple[nn.Module, list[Tensor], DataLoader, LitConvNet]:
    """The seeded convnet (with pooling), random input batches, a loader yielding them as they are (no collation),
    and the LightningModule around the net."""
    setup_threads()
    torch.manual_seed(0)
    net = convnet(downsample=True).to(args.device).eval()
    batches = [torch.randn(args.batch_size, 3, args.size, args.size) for _ in range(args.batches)]
    return net, batches, DataLoader(batches, batch_size=None), LitConvNet(net)


def benchmark_means(report: Artefact) -> str:
    """The mean error % over the corruptions of every method in a ``recipes/benchmark.py`` report, and the clean
    error of ``source`` and ``bn``: how README.md quotes a reduced benchmark run."""
    results = report["results"]
    means = ", ".join(f"{method} {r['mean']:.1f}" for method, r in results.items())
    clean = ", ".join(f"{method} {results[method]['clean']:.1f}" for method in ("source", "bn") if method in results)
    return f"mean error at severity {report['table_severity']}: {means} (clean: {clean})"
