"""Long online adaptation: memory, throughput, non-finite outputs and collapse resets over a stream of 100k+ samples.

Run: ``.venv/bin/python benchmarks/ttt_stream.py [--cycles 10] [--batch-size 64] [--window 100] [--threads 1]``;
writes ``benchmarks/results/ttt_stream.json`` (``--artefact NAME`` for another name).

The model is the digits CNN of ``recipes/digits.py`` (two conv + BatchNorm blocks, 6k parameters), trained
deterministically for ``--epochs`` epochs on scikit-learn's digits. The stream is the 719-image test split corrupted
by ``ttc_lightning.data.stream`` in continual mode (the 15 corruptions in order at ``--severity``, no reset between
them), repeated ``--cycles`` times with corruption seeds 0, 1, ...: 10,785 samples per cycle, 107,850 by
default (1,686 batches of 64), fed in order through a ``DataLoader`` over a ``TensorDataset`` of (image, label).

Each configuration runs the whole stream once through ``Trainer.predict(..., return_predictions=False)``, in its own
subprocess (this script with ``--child NAME``, reading the model and the stream the parent saved), so that memory
freed by one configuration cannot hide the growth of the next:

* ``source``: no adaptation (the reference for memory and throughput);
* ``tent``: ``ttc.Tent`` (Adam, lr 1e-3), continual, no collapse detection;
* ``tent-fast``: ``ttc.Tent`` with Adam lr ``--fast-lr``, a rate at which long continual adaptation collapses;
* ``tent-fast-reset``: the same with ``resets=Resets(on_collapse=--collapse-below, on_nonfinite=True)``;
* ``sar``: ``ttc.SAR`` defaults (SGD lr 2.5e-4, momentum 0.9, reset below 0.2);
* ``eata``: ``ttc.EATA`` (Adam lr 1e-3, ``d_margin=0.4`` for 10 classes);
* ``tent-fast-reset+writer``: ``tent-fast-reset`` with a ``ttc.PredictionWriter`` writing every prediction to a
  file, which is then loaded and checked (one row per sample, as many errors as counted on the fly);
* ``source+forget``, ``tent+forget``: controls with a callback that drops each finished batch's entry of
  Lightning's record of batch indices (see below), to show what memory growth is left without it.

A monitor callback reads every batch's output in ``on_predict_batch_end`` (adding Python numbers only: no tensor is
kept) and closes a window every ``--window`` batches: samples per second over the window (data loading, adaptation
and callbacks included), the resident memory (RSS, ``/proc/self/statm``) at its end, the error %, the mean
prediction entropy, the non-finite outputs and the resets, updates and skipped updates of the adaptation callback.
After each window, outside its clock, it runs ``gc.collect()`` and counts the live tensors and the objects the
garbage collector tracks (a per-batch leak, such as tensors kept in a list, autograd graphs held alive or growing
state, shows as a count growing with the window; the monitor's own record adds one object per window), and the
memory of Lightning's own record of the batch indices (``_IndexBatchSamplerWrapper.seen_batch_indices``, one list
of ints per batch, kept for the whole predict epoch whether or not a prediction writer reads it). The summary per
configuration compares the first and last full windows: RSS growth (MB) and how much of it those index lists
explain, the growth of live tensors and objects, the ratio of throughputs (and of the median window throughputs of
the second and first halves of the stream), and totals of non-finite outputs, resets
and skipped updates; and gives the least-squares slope of RSS against samples over the second half of the windows
(MB per 100k samples; the first half holds the allocator's warm-up).
"""

import argparse
import functools
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))

import lightning.pytorch as pl
import torch
from common import Artefact, add_artefact_option, header, load, median, save, setup_threads, table
from digits import DigitsCNN, digits, quiet, train
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

import ttc_lightning as ttc
from ttc_lightning.data import stream
from ttc_lightning.ttt.objectives import entropy

CONFIGS = (
    "source",
    "source+forget",
    "tent",
    "tent+forget",
    "tent-fast",
    "tent-fast-reset",
    "sar",
    "eata",
    "tent-fast-reset+writer",
    "tent-fast-reset+writer+forget",
)


def rss_mb() -> float:
    """The resident memory of this process in MB (``/proc/self/statm``; the peak from ``getrusage`` elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def census() -> tuple[int, int]:
    """Live tensors and objects tracked by the garbage collector, after a collection."""
    gc.collect()
    objects = gc.get_objects()
    with warnings.catch_warnings():  # isinstance reaches deprecated module attributes (torch.distributed.reduce_op)
        warnings.simplefilter("ignore")
        return sum(1 for o in objects if isinstance(o, Tensor)), len(objects)


def index_records(trainer: pl.Trainer) -> list[list[list[int] | None]]:
    """Lightning's record of the batch indices of each predict dataloader so far: ``seen_batch_indices`` of its
    ``_IndexBatchSamplerWrapper``, one list of ints per batch, kept for the whole predict epoch."""
    loaders = trainer.predict_dataloaders
    loaders = loaders if isinstance(loaders, list) else [loaders]
    return [getattr(getattr(loader, "batch_sampler", None), "seen_batch_indices", []) for loader in loaders]


def index_lists_mb(trainer: pl.Trainer) -> float:
    """Memory (MB) of the batch indices Lightning's predict loop has recorded so far (lists of Python ints)."""
    total = 0
    for record in index_records(trainer):
        for batch in record:
            if batch is not None:  # smaller ints are cached by Python
                total += sys.getsizeof(batch) + sum(sys.getsizeof(i) for i in batch if i > 256)
    return total / 2**20


class ForgetBatchIndices(Callback):
    """Replaces each finished batch's entry of Lightning's batch-index record by ``None`` (positions stay valid for
    the loop, which reads only the current batch's entry): the control that shows what the record costs."""

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        record = index_records(trainer)[dataloader_idx]
        if batch_idx < len(record):
            record[batch_idx] = None


@dataclass
class Window:
    """What the monitor measured over one window of batches."""

    batches: int
    samples: int
    seconds: float
    rss_mb: float
    errors: int
    entropy_sum: float
    nonfinite: int
    resets: int
    updates: int
    skipped: int
    tensors: int
    objects: int
    index_mb: float

    @property
    def throughput(self) -> float:
        return self.samples / self.seconds

    @property
    def error(self) -> float:
        return 100 * self.errors / self.samples

    @property
    def entropy(self) -> float:
        return self.entropy_sum / max(self.samples - self.nonfinite, 1)


class Monitor(Callback):
    """Per-window figures of a predict run over batches ``(images, labels)``.

    Args:
        window: batches per window. Default ``100``.
        adaptation: the run's adaptation callback, whose ``resets``, ``updates`` and ``skipped`` are read, or
            ``None``. Default ``None``.
        count_objects: count live tensors, objects and Lightning's index lists after each window (outside its
            clock). Default ``True``.
    """

    def __init__(
        self, window: int = 100, adaptation: ttc.TestTimeTraining | None = None, count_objects: bool = True
    ) -> None:
        self.window, self.adaptation, self.count_objects = window, adaptation, count_objects
        self.windows: list[Window] = []
        self._figures = (0, 0, 0)
        self._open()

    def _open(self) -> None:
        self._batches = self._samples = self._errors = self._nonfinite = 0
        self._entropy = 0.0
        self._start = time.perf_counter()

    def _adaptation_figures(self) -> tuple[int, int, int]:
        a = self.adaptation
        return (0, 0, 0) if a is None else (a.resets, a.updates, a.skipped)

    def _close(self, trainer: pl.Trainer) -> None:
        seconds = time.perf_counter() - self._start
        rss = rss_mb()
        figures = self._adaptation_figures()
        resets, updates, skipped = (now - before for now, before in zip(figures, self._figures, strict=True))
        self._figures = figures
        tensors, objects = census() if self.count_objects else (0, 0)
        index_mb = index_lists_mb(trainer) if self.count_objects else 0.0
        self.windows.append(
            Window(
                self._batches,
                self._samples,
                seconds,
                rss,
                self._errors,
                self._entropy,
                self._nonfinite,
                resets,
                updates,
                skipped,
                tensors,
                objects,
                index_mb,
            )
        )
        self._open()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.windows = []
        self._figures = self._adaptation_figures()
        self._open()

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        labels = batch[1]
        finite = torch.isfinite(outputs).all(1)
        self._batches += 1
        self._samples += len(labels)
        self._nonfinite += int((~finite).sum())
        self._errors += int((outputs.argmax(1) != labels).sum())
        self._entropy += float(entropy(outputs[finite]).sum())
        if self._batches == self.window:
            self._close(trainer)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._batches:
            self._close(trainer)


def build_stream(cycles: int, severity: int) -> tuple[Tensor, Tensor]:
    """The digits test split under the 15 corruptions in a row at ``severity``, ``cycles`` times with seeds 0, 1, ..."""
    _, _, images, labels = digits()
    cycle = functools.partial(stream, images, labels, severities=(severity,), mode="continual")
    segments = [segment for seed in range(cycles) for segment in cycle(seed=seed)]
    return torch.cat([s.images for s in segments]), torch.cat([s.labels for s in segments])


def adaptation(name: str, args: argparse.Namespace) -> ttc.TestTimeTraining | None:
    """The adaptation callback of configuration ``name``."""
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    fast = functools.partial(torch.optim.Adam, lr=args.fast_lr)
    makers: dict[str, Callable[[], ttc.TestTimeTraining | None]] = {
        "source": lambda: None,
        "tent": lambda: ttc.Tent(optimizer=adam),
        "tent-fast": lambda: ttc.Tent(optimizer=fast),
        "tent-fast-reset": lambda: ttc.Tent(
            optimizer=fast, resets=ttc.Resets(on_collapse=args.collapse_below, on_nonfinite=True)
        ),
        "sar": lambda: ttc.SAR(),
        "eata": lambda: ttc.EATA(optimizer=adam, d_margin=0.4),
    }
    return makers[name.split("+")[0]]()


def check_written(path: str, labels: Tensor, windows: list[Window]) -> str:
    """Load the writer's file and compare it with the stream and with the errors the monitor counted."""
    logits = ttc.load_predictions(path)
    errors = int((logits.argmax(1) != labels).sum())
    measured = sum(w.errors for w in windows)
    rows = "ok" if len(logits) == len(labels) else "MISMATCH"
    same = "ok" if errors == measured else "MISMATCH"
    return (
        f"written file: {len(logits)} rows for {len(labels)} samples ({rows}), {errors} errors in the file vs "
        f"{measured} counted on the fly ({same})"
    )


def child(name: str, data: str, args: argparse.Namespace) -> None:
    """Run configuration ``name`` on the model and stream saved in ``data``; print its figures as a JSON line."""
    setup_threads()
    torch.set_num_threads(args.threads)
    quiet()
    model = DigitsCNN()
    model.load_state_dict(torch.load(os.path.join(data, "model.pt"), weights_only=True))
    images, labels = torch.load(os.path.join(data, "stream.pt"), weights_only=True)
    loader = DataLoader(TensorDataset(images, labels), batch_size=args.batch_size)
    pl.seed_everything(0, verbose=False)
    method = adaptation(name, args)
    monitor = Monitor(args.window, method, not args.no_census)
    callbacks: list[Callback] = [monitor] + ([method] if method is not None else [])
    path = os.path.join(data, f"{name}.predictions.pt")
    extras = name.split("+")[1:]
    if "writer" in extras:
        callbacks.append(ttc.PredictionWriter(path))
    if "forget" in extras:
        callbacks.append(ForgetBatchIndices())
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.predict(model.eval(), dataloaders=loader, return_predictions=False)
    seconds = time.perf_counter() - start
    written = check_written(path, labels, monitor.windows) if "writer" in extras else ""
    windows = [asdict(w) for w in monitor.windows]
    print(json.dumps({"windows": windows, "seconds": seconds, "written": written}))


def slope_per_100k(windows: list[Window]) -> float:
    """Least-squares slope of RSS (MB) against samples seen, per 100k samples, over the second half of the windows
    (the first half holds the allocator's warm-up)."""
    points, seen = [], 0
    for w in windows:
        seen += w.samples
        points.append((seen, w.rss_mb))
    points = points[len(points) // 2 :]
    if len(points) < 2:
        return math.nan
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return 1e5 * sum((x - mx) * (y - my) for x, y in points) / sxx


def window_table(windows: list[Window]) -> str:
    """One row per window."""
    rows, seen = [], 0
    for i, w in enumerate(windows):
        seen += w.samples
        rows.append(
            [
                i,
                seen,
                f"{w.throughput:.0f}",
                f"{w.rss_mb:.1f}",
                f"{w.index_mb:.2f}",
                f"{w.error:.1f}",
                f"{w.entropy:.3f}",
                w.nonfinite,
                w.resets,
                w.updates,
                w.skipped,
                w.tensors,
                w.objects,
            ]
        )
    columns = ["window", "samples seen", "samples/s", "RSS MB", "index lists MB", "error %", "entropy", "non-finite"]
    return table([*columns, "resets", "updates", "skipped", "live tensors", "gc objects"], rows)


def summary_row(name: str, result: dict[str, Any], windows: list[Window], window: int) -> list[object]:
    """The summary of one configuration (first and last full windows compared)."""
    full = [w for w in windows if w.batches == window] or windows
    first, last = full[0], full[-1]
    half = len(full) // 2
    samples = sum(w.samples for w in windows)
    return [
        name,
        samples,
        f"{result['seconds']:.1f}",
        f"{median([w.throughput for w in full]):.0f}",
        f"{100 * sum(w.errors for w in windows) / samples:.1f}",
        f"{first.rss_mb:.0f}",
        f"{last.rss_mb - first.rss_mb:+.2f}",
        f"{last.index_mb - first.index_mb:+.2f}",
        f"{slope_per_100k(windows):+.2f}",
        f"{last.tensors - first.tensors:+d}",
        f"{last.objects - first.objects:+d}",
        f"{last.throughput / first.throughput:.2f}",
        f"{median([w.throughput for w in full[-half:]]) / median([w.throughput for w in full[:half]]):.2f}"
        if half
        else "",
        sum(w.nonfinite for w in windows),
        sum(w.updates for w in windows),
        sum(w.resets for w in windows),
        sum(w.skipped for w in windows),
    ]


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10, help="passes over the corrupted test split (10,785 each)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--window", type=int, default=100, help="batches per measurement window")
    parser.add_argument("--severity", type=int, default=5, choices=range(1, 6))
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of the digits CNN")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of each configuration")
    parser.add_argument("--fast-lr", type=float, default=1e-2, help="Adam lr of tent-fast and tent-fast-reset")
    parser.add_argument("--collapse-below", type=float, default=0.05, help="resets.on_collapse of tent-fast-reset")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--no-census", action="store_true", help="skip the counts after each window")
    parser.add_argument(
        "--windows",
        nargs="*",
        default=["tent-fast", "tent-fast-reset"],
        choices=CONFIGS,
        help="configs shown by window",
    )
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    add_artefact_option(parser, "ttt_stream")
    args = parser.parse_args()
    if args.cycles < 1 or args.batch_size < 2 or args.window < 1 or args.threads < 1:
        parser.error("--cycles, --window and --threads must be >= 1 and --batch-size >= 2 (batch statistics)")
    return args


def child_arguments(args: argparse.Namespace) -> list[str]:
    """The options a child needs, as command-line arguments."""
    options = {
        "--batch-size": args.batch_size,
        "--window": args.window,
        "--threads": args.threads,
        "--fast-lr": args.fast_lr,
        "--collapse-below": args.collapse_below,
    }
    return [str(a) for option, value in options.items() for a in (option, value)] + (
        ["--no-census"] if args.no_census else []
    )


def main() -> None:
    args = arguments()
    if args.child:
        child(args.child, args.data, args)
        return
    start_load = load()
    setup_threads()
    quiet()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as data:
        torch.set_num_threads(1)  # the trained model then does not depend on the core count or --threads
        torch.save(train(epochs=args.epochs).state_dict(), os.path.join(data, "model.pt"))
        torch.set_num_threads(args.threads)
        images, labels = build_stream(args.cycles, args.severity)
        torch.save((images, labels), os.path.join(data, "stream.pt"))
        for name in args.configs:
            command = [sys.executable, os.path.abspath(__file__), *child_arguments(args), "--child", name]
            done = subprocess.run([*command, "--data", data], capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name} failed:\n{done.stderr}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{name}: {results[name]['seconds']:.1f} s", file=sys.stderr, flush=True)
    del args.child, args.data
    artefact = save(args, {"samples": len(images), "configs": results}, start_load)
    batches = -(-len(images) // args.batch_size)
    print(header("Long online adaptation: memory, throughput, NaN, resets", artefact))
    print(
        f"Stream: digits test split (719) under the 15 corruptions in a row (continual) at severity {args.severity}, "
        f"{args.cycles} cycles with seeds 0-{args.cycles - 1}: {len(images)} samples, {batches} batches of "
        f"{args.batch_size}, windows of {args.window} batches; digits CNN trained {args.epochs} epochs; "
        f"{args.threads} torch thread(s) per configuration, each in its own process; tent-fast: Adam lr "
        f"{args.fast_lr}, reset below {args.collapse_below}. First/last: the first and last full windows.\n"
    )
    summary, written, collapse = render(artefact)
    print(summary)
    print(written + "\n")
    print(collapse)
    for name in args.windows:
        if name in results:
            print(f"### {name}, per window\n")
            print(window_table([Window(**w) for w in results[name]["windows"]]))


def render(artefact: Artefact) -> list[str]:
    """The summary table, the writer's check and the per-window collapse table, from the artefact."""
    args, results = artefact["arguments"], artefact["results"]["configs"]
    columns = ["config", "samples", "wall s", "samples/s (median window)", "error %", "RSS first MB"]
    columns += ["RSS last-first MB", "index lists last-first MB", "RSS MB / 100k (slope, 2nd half)"]
    columns += ["live tensors last-first", "gc objects last-first", "throughput last/first"]
    columns += ["throughput 2nd/1st half (medians)", "non-finite", "updates", "resets", "skipped"]
    windows = {name: [Window(**w) for w in result["windows"]] for name, result in results.items()}
    rows = [summary_row(name, r, windows[name], args["window"]) for name, r in results.items()]
    written = "\n".join(f"{name}: {r['written']}" for name, r in results.items() if r["written"])
    return [table(columns, rows), written, collapse_table(windows, args["windows"])]


def collapse_table(windows: dict[str, list[Window]], names: list[str]) -> str:
    """Error %, mean entropy and resets per window (columns) of the configurations ``names``."""
    shown = [name for name in names if name in windows]
    if not shown:
        return ""
    seen, columns = 0, ["samples seen (k)"]
    for w in windows[shown[0]]:
        seen += w.samples
        columns.append(f"{seen / 1000:.1f}")
    rows: list[list[object]] = []
    for name in shown:
        rows.append([f"{name} error %", *(f"{w.error:.1f}" for w in windows[name])])
        rows.append([f"{name} entropy", *(f"{w.entropy:.3f}" for w in windows[name])])
        if any(w.resets for w in windows[name]):
            rows.append([f"{name} resets", *(w.resets for w in windows[name])])
    return table(columns, rows)


if __name__ == "__main__":
    main()
