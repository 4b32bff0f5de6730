"""The corruption benchmark: what each test-time strategy buys under distribution shift.

    python recipes/benchmark.py                                  # every method of the suite, digits
    python recipes/benchmark.py methods=[source,bn,tent] corruptions=[gaussian_noise,fog] severities=[5]
    python recipes/benchmark.py -m ttc/ttt=none,bn,tent,eata     # a sweep: one composition per job
    python recipes/aggregate.py multirun/<date>/<time>           # one table from a sweep's jobs

Trains a small CNN on the source data once (deterministic, cached under ``train.cache_dir``), builds the corrupted
test streams (``ttc_lightning.data``), predicts every segment with every method through ``trainer.predict``, prints
a markdown table (error % per method and corruption at ``table_severity``, clean error, their mean, NLL and ECE)
and writes into the Hydra run directory:

* ``results.json``: ``{method: {corruption: error %, ..., "clean": x, "mean": x}}`` at ``table_severity``;
* ``report.json``: the same with NLL, ECE, batch size and seconds per method, the settings, the command, the date,
  the machine, the versions and the load average (the form of ``benchmarks/results/digits_results.json``);
* ``results.csv``: every method, corruption and severity with error %, NLL and ECE;
* ``severity.png``: mean error over the corruptions against severity, one line per method;
* ``model.ckpt``'s path in the log, for ``recipes/predict.py ckpt_path=...``.

``publish=DIR`` also copies ``report.json``, ``results.csv`` and ``severity.png`` to ``DIR/<data>_results.json``,
``DIR/<data>_results.csv`` and ``DIR/<data>_severity.png`` (the committed artefacts: ``publish=benchmarks/results``).
When ``benchmarks/results/<data>_results.json`` exists with the same settings, the run says whether its table equals
the committed one. EATA methods listed in ``fisher.methods`` get ``fisher.samples`` clean images of the source
training split as ``fisher_data``; the others run without the regulariser (ETA). A method in ``method_severities``
runs only the clean segment and those at its severities; ``threads`` sets torch's thread count.
"""

import datetime
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from digits import TRAIN_VIEWS, fit, quiet
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from loaders import load
from omegaconf import DictConfig, OmegaConf
from schemas import register
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import multiclass_calibration_error

import ttc_lightning as ttc
from ttc_lightning.data import CORRUPTIONS, Shift, stream

register()
ROOT = Path(__file__).resolve().parents[1]
#: The committed artefacts of the benchmark.
RESULTS = ROOT / "benchmarks" / "results"
#: The settings that decide the numbers: a committed artefact is compared with a run only when these agree.
SETTINGS = (
    *("data", "model", "methods", "suite", "batch_sizes", "method_severities", "fisher", "corruptions", "severities"),
    *("table_severity", "stream", "seed", "subset", "train", "threads"),
)
#: Short column names, as in RobustBench's tables.
SHORT = {
    "gaussian_noise": "gauss",
    "shot_noise": "shot",
    "impulse_noise": "impul",
    "defocus_blur": "defoc",
    "glass_blur": "glass",
    "motion_blur": "motn",
    "zoom_blur": "zoom",
    "snow": "snow",
    "frost": "frost",
    "fog": "fog",
    "brightness": "brit",
    "contrast": "contr",
    "elastic_transform": "elast",
    "pixelate": "pixel",
    "jpeg_compression": "jpeg",
}
#: Part of the cache key: bump it when training changes, so stale checkpoints are not reused.
TRAINING_VERSION = 2


def train_source(cfg: DictConfig, x_train: Tensor, y_train: Tensor) -> tuple[L.LightningModule, str]:
    """The source model, trained once per data, model and training settings, then loaded from the cache."""
    settings = {"data": cfg.data.name, "model": OmegaConf.to_container(cfg.model), **OmegaConf.to_container(cfg.train)}
    settings["recipe"] = TRAINING_VERSION
    settings["threads"] = cfg.threads  # the thread count changes training's float sums, hence the weights
    settings.pop("cache_dir"), settings.pop("progress_bar")
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cfg.train.cache_dir) / f"{cfg.data.name}-{key}.ckpt"
    L.seed_everything(cfg.train.seed, verbose=False)  # before the model draws its initial weights
    model = instantiate(cfg.model)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        print(f"Source model loaded from {path}")
        return model.eval(), str(path)
    print(f"Training the source model ({cfg.train.epochs} epochs on {cfg.data.name}); cached at {path}")
    if cfg.train.augment:
        model.train_views = TRAIN_VIEWS
    run = fit(model, (x_train, y_train), cfg.train.epochs, cfg.train.batch_size, cfg.train.progress_bar)
    path.parent.mkdir(parents=True, exist_ok=True)
    run.save_checkpoint(path, weights_only=True)
    return model.eval(), str(path)


def setup(cfg: DictConfig) -> None:
    """Quiet Lightning and set torch's intra-op thread count to ``cfg.threads`` (``null``: torch's default)."""
    quiet()
    if cfg.threads is not None:
        if not isinstance(cfg.threads, int) or isinstance(cfg.threads, bool) or cfg.threads < 1:
            raise ValueError(f"`threads`={cfg.threads!r} must be an integer >= 1 or null (torch's default).")
        torch.set_num_threads(cfg.threads)


def compositions(cfg: DictConfig) -> dict[str, DictConfig | list[DictConfig]]:
    """Method name -> callback configs: the suite's ``methods``, or the one composition the command line picked."""
    picked = [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").startswith("ttc/")]
    if picked:
        choices = HydraConfig.get().runtime.choices
        ttt, tta, iterative = (choices.get(f"ttc/{group}", "none") for group in ("ttt", "tta", "iterative"))
        parts = [ttt, f"tta-{tta}", f"iterative-{iterative}"]
        name = "+".join(p for p in parts if not p.endswith("none")) or "source"
        return {name: [node for node in cfg.ttc.values() if node]}
    unknown = [m for m in cfg.methods if m != "source" and m not in cfg.suite]
    if unknown:
        raise ValueError(f"`methods` {unknown} are not in the suite; allowed: source, {', '.join(cfg.suite)}.")
    return {m: [] if m == "source" else [cfg.suite[m]] for m in cfg.methods}


def runs(segments: Sequence[Shift]) -> list[list[Shift]]:
    """Consecutive segments grouped into runs that each start from the source model."""
    grouped: list[list[Shift]] = []
    for segment in segments:
        if segment.reset or not grouped:
            grouped.append([])
        grouped[-1].append(segment)
    return grouped


def fisher_loader(cfg: DictConfig, x_train: Tensor) -> DataLoader:
    """EATA's Fisher data: the first ``fisher.samples`` images of the source training split, at the test batch
    size (EATA's code estimates the Fisher information on clean batches of its test batch size)."""
    samples = cfg.fisher.samples
    if not isinstance(samples, int) or isinstance(samples, bool) or not 0 < samples <= len(x_train):
        raise ValueError(f"`fisher.samples`={samples!r} must be an integer from 1 to {len(x_train)} (training split).")
    return DataLoader(TensorDataset(x_train[:samples]), batch_size=cfg.data.batch_size)


def uses_fisher(cfg: DictConfig, method: str) -> bool:
    """Whether ``method`` (a suite name, or a sweep's composition name such as ``eata+tta-hflip``, named after its
    ``ttc/ttt`` choice) is listed in ``fisher.methods``."""
    return method.split("+")[0] in cfg.fisher.methods


def method_segments(cfg: DictConfig, method: str, segments: list[Shift]) -> list[Shift]:
    """The segments ``method`` runs: all of them, or for a method in ``method_severities`` (by suite name, or a
    sweep's ``ttc/ttt`` choice) the clean one and those at its severities, in stream order."""
    severities = cfg.method_severities.get(method.split("+")[0])
    if severities is None:
        return segments
    if cfg.table_severity not in severities or not set(severities) <= set(cfg.severities):
        raise ValueError(
            f"`method_severities.{method}`={list(severities)} must hold table_severity={cfg.table_severity} and "
            f"only severities the run has ({list(cfg.severities)})."
        )
    return [s for s in segments if s.name == "clean" or s.severity in severities]


def strategy(node: DictConfig, fisher: DataLoader | None) -> L.Callback:
    """The callback of ``node``; an EATA also gets ``fisher`` as its Fisher data when given."""
    if fisher is not None and node.get("_target_") == "ttc_lightning.EATA":
        return instantiate(node, fisher_data=fisher)
    return instantiate(node)


def evaluate(
    model: L.LightningModule,
    callbacks: list[DictConfig],
    segments: list[Shift],
    cfg: DictConfig,
    batch_size: int,
    fisher: DataLoader | None = None,
) -> list[dict[str, Any]]:
    """Error %, NLL and ECE of one method on every segment; one ``trainer.predict`` per run of segments. EATA
    callbacks get ``fisher`` as their Fisher data."""
    rows = []
    for run in runs(segments):
        strategies = [strategy(node, fisher) for node in callbacks]
        trainer = instantiate(cfg.trainer, callbacks=strategies, enable_progress_bar=False)
        images = torch.cat([s.images for s in run])
        loader = DataLoader(TensorDataset(images), batch_size=batch_size)
        logits = torch.cat(trainer.predict(model, loader)).float()  # type: ignore[arg-type]
        for segment, out in zip(run, logits.split([len(s.images) for s in run]), strict=True):
            labels = segment.labels
            rows.append(
                {
                    "corruption": segment.name,
                    "severity": segment.severity,
                    "error": (out.argmax(1) != labels).float().mean().item() * 100,
                    "nll": F.cross_entropy(out, labels).item(),
                    "ece": multiclass_calibration_error(out.softmax(1), labels, out.shape[1], n_bins=15).item(),
                }
            )
    return rows


def summary(rows: list[dict[str, Any]], severity: int) -> dict[str, float]:
    """``{corruption: error %, ..., "clean": x, "mean": x}`` at ``severity`` (mean over repeated segments)."""
    table: dict[str, list[float]] = {}
    for row in rows:
        if row["corruption"] == "clean" or row["severity"] == severity:
            table.setdefault(row["corruption"], []).append(row["error"])
    out = {name: sum(v) / len(v) for name, v in table.items()}
    shifted = [v for k, v in out.items() if k != "clean"]
    out["mean"] = sum(shifted) / len(shifted) if shifted else math.nan
    return out


def markdown(
    results: dict[str, dict[str, float]],
    calibration: dict[str, tuple[float, float]] | None = None,
    labels: dict[str, str] | None = None,
) -> str:
    """The results table: methods as rows (named by ``labels`` where given); clean, corruptions, mean (and NLL,
    ECE when given) as columns."""
    columns = list(dict.fromkeys(k for r in results.values() for k in r if k not in ("clean", "mean")))
    head = ["method", "clean", *(SHORT.get(c, c) for c in columns), "mean", *(["NLL", "ECE %"] if calibration else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in results.items():
        cells = [r.get("clean", math.nan), *(r.get(c, math.nan) for c in columns), r["mean"]]
        row = f"| {(labels or {}).get(method, method)} | " + " | ".join(f"{v:.1f}" for v in cells) + " |"
        if calibration:
            nll, ece = calibration[method]
            row += f" {nll:.3f} | {ece:.1f} |"
        lines.append(row)
    return "\n".join(lines)


def label(method: str, batch_size: int, default: int) -> str:
    """A method's name in the table and plot, with its batch size where it is not the data's (``memo (batch 16)``)."""
    return method if batch_size == default else f"{method} (batch {batch_size})"


def plot(rows: dict[str, list[dict[str, Any]]], path: Path, labels: dict[str, str]) -> None:
    """Mean error over the corruptions against severity, one line per method (named by ``labels``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, method_rows in rows.items():
        by_severity: dict[int, list[float]] = {}
        for row in method_rows:
            if row["corruption"] != "clean":
                by_severity.setdefault(row["severity"], []).append(row["error"])
        xs = sorted(by_severity)
        ax.plot(xs, [sum(by_severity[s]) / len(by_severity[s]) for s in xs], marker="o", label=labels[method])
    ax.set_xlabel("severity")
    ax.set_ylabel("error % (mean over corruptions)")
    ax.set_xticks(range(1, 6))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the system does not report them)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


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


def provenance(script: str, overrides: Sequence[str], started: tuple[float, list[float]]) -> dict[str, Any]:
    """Where an artefact comes from: the command (``script`` and its ``overrides``), date, machine, versions, load
    average and wall time since ``started`` (``time.perf_counter()`` and :func:`load_average` at the start)."""
    return {
        "command": " ".join([f".venv/bin/python {script}", *overrides]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": L.__version__,
            "ttc_lightning": ttc.__version__,
        },
        "load_average": {"start": started[1], "end": load_average()},
        "seconds": round(time.perf_counter() - started[0], 1),
    }


def settings(cfg: DictConfig) -> dict[str, Any]:
    """The configuration that decides the numbers (:data:`SETTINGS`, the trainer; no cache path, no progress bar)."""
    out = {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in (*SETTINGS, "trainer")
    }
    out["train"] = {k: v for k, v in out["train"].items() if k not in ("cache_dir", "progress_bar")}
    return out


def report(
    cfg: DictConfig,
    rows: dict[str, list[dict[str, Any]]],
    seconds: dict[str, float],
    samples: int,
    started: tuple[float, list[float]],
) -> dict[str, Any]:
    """The run's artefact: per method its errors at ``table_severity`` (as ``results.json``), NLL and ECE % (means
    over the corruptions at that severity), batch size and seconds; the settings, command, date, machine, versions
    and load average."""
    severity = cfg.table_severity
    results: dict[str, dict[str, Any]] = {}
    for method, method_rows in rows.items():
        shifted = [r for r in method_rows if r["corruption"] != "clean" and r["severity"] == severity]
        results[method] = {
            "batch_size": cfg.batch_sizes.get(method, cfg.data.batch_size),
            "seconds": round(seconds[method], 1),
            **summary(method_rows, severity),
            "nll": sum(r["nll"] for r in shifted) / max(len(shifted), 1),
            "ece": sum(r["ece"] for r in shifted) / max(len(shifted), 1) * 100,
        }
    overrides = list(HydraConfig.get().overrides.task)
    return {
        **provenance("recipes/benchmark.py", overrides, started),
        "cpu_seconds": round(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),
        "settings": settings(cfg),
        "samples": samples,
        "table_severity": severity,
        "notes": {m: note for m, note in OmegaConf.to_container(cfg.notes, resolve=True).items() if m in rows},
        "results": results,
    }


#: The keys of a method's entry in a report that are not table columns.
EXTRAS = ("batch_size", "seconds", "nll", "ece")


def table(artefact: dict[str, Any]) -> str:
    """The markdown table of a report: a method whose batch size is not the data's is named with it, e.g.
    ``memo (batch 16)``."""
    default = artefact["settings"]["data"]["batch_size"]
    results = artefact["results"]
    errors = {m: {k: v for k, v in r.items() if k not in EXTRAS} for m, r in results.items()}
    calibration = {m: (r["nll"], r["ece"]) for m, r in results.items()}
    labels = {m: label(m, r["batch_size"], default) for m, r in results.items()}
    return markdown(errors, calibration, labels)


def readme_block(artefact: dict[str, Any]) -> str:
    """What README.md shows of a report: a caption naming the setting and the run, the table, the notes."""
    s = artefact["settings"]
    corruptions = len([k for k in next(iter(artefact["results"].values())) if k not in (*EXTRAS, "clean", "mean")])
    stream_words = {"reset": "each shift adapted to from the source model"}.get(s["stream"], f"{s['stream']} stream")
    m, v = artefact["machine"], artefact["versions"]
    loads = artefact["load_average"]
    cpu = f" ({artefact['cpu_seconds']:.0f} s of CPU time)" if "cpu_seconds" in artefact else ""
    caption = (
        f"Error % at severity {artefact['table_severity']} of {corruptions} corruptions ({stream_words}) on the "
        f"{artefact['samples']} test images of `{s['data']['name']}`, batch {s['data']['batch_size']} unless named; "
        f"NLL and ECE: means over the corruptions at that severity. Run of {artefact['date'][:10]} "
        f"(`{artefact['command']}`): {m['cpu']}, {m['cores']} cores, torch {v['torch']}, lightning {v['lightning']}; "
        f"{artefact['seconds']:.0f} s in all{cpu}, load average {loads['start'][0] if loads['start'] else '?'} at "
        "start."
    )
    notes = [f"`{method}`: {note}" for method, note in (artefact.get("notes") or {}).items()]
    return "\n\n".join([caption, table(artefact), *notes])


def compare(artefact: dict[str, Any], path: Path) -> str | None:
    """Whether ``artefact``'s table equals the one of the committed report at ``path``, when that report exists and
    has the same settings."""
    if not path.exists():
        return None
    committed = json.loads(path.read_text())
    if committed.get("settings") != artefact["settings"]:
        return f"Settings differ from {path.relative_to(ROOT)}: not compared."
    same = table(committed) == table(artefact)
    return f"Table {'equals' if same else 'DIFFERS from'} the committed {path.relative_to(ROOT)}."


@hydra.main(config_path="../configs", config_name="benchmark", version_base=None)
def main(cfg: DictConfig) -> dict[str, dict[str, float]]:
    setup(cfg)
    started = (time.perf_counter(), load_average())
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    methods = compositions(cfg)
    for option in ("fisher.methods", "method_severities"):
        unknown = [m for m in OmegaConf.select(cfg, option) if m not in cfg.suite]
        if unknown:
            raise ValueError(f"`{option}` {unknown} are not in the suite; allowed: {', '.join(cfg.suite)}.")
    x_train, y_train, x_test, y_test = load(cfg.data.name)
    model, checkpoint = train_source(cfg, x_train, y_train)
    fisher = fisher_loader(cfg, x_train)
    if cfg.subset is not None:
        x_test, y_test = x_test[: cfg.subset], y_test[: cfg.subset]
    corruptions = CORRUPTIONS if cfg.corruptions == "all" else tuple(cfg.corruptions)
    segments = [Shift("clean", 0, x_test, y_test, True)]
    segments += stream(x_test, y_test, corruptions, tuple(cfg.severities), cfg.stream, cfg.seed)
    print(f"{len(methods)} method(s) x {len(segments)} segments of {len(x_test)} samples ({cfg.stream} stream)")
    rows: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    for method, callbacks in methods.items():
        batch_size = cfg.batch_sizes.get(method, cfg.data.batch_size)
        start = time.perf_counter()
        kept = method_segments(cfg, method, segments)
        rows[method] = evaluate(
            model, list(callbacks), kept, cfg, batch_size, fisher if uses_fisher(cfg, method) else None
        )
        seconds[method] = time.perf_counter() - start
        mean = summary(rows[method], cfg.table_severity)["mean"]
        print(f"  {method}: mean error {mean:.1f} % ({seconds[method]:.0f} s)", flush=True)
    results = {method: summary(method_rows, cfg.table_severity) for method, method_rows in rows.items()}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    with open(out_dir / "results.csv", "w") as f:
        f.write("method,corruption,severity,error,nll,ece\n")
        for m, method_rows in rows.items():
            for r in method_rows:
                f.write(f"{m},{r['corruption']},{r['severity']},{r['error']:.3f},{r['nll']:.5f},{r['ece']:.5f}\n")
    artefact = report(cfg, rows, seconds, len(x_test), started)
    batch = cfg.data.batch_size
    plot(rows, out_dir / "severity.png", {m: label(m, r["batch_size"], batch) for m, r in artefact["results"].items()})
    (out_dir / "report.json").write_text(json.dumps(artefact, indent=1) + "\n")
    print(f"\n{readme_block(artefact)}\n")
    print(
        f"Source checkpoint: {checkpoint}\nWritten to {out_dir}: results.json, report.json, results.csv, severity.png"
    )
    verdict = compare(artefact, RESULTS / f"{cfg.data.name}_results.json")
    if cfg.publish:
        target = Path(hydra.utils.to_absolute_path(cfg.publish))
        target.mkdir(parents=True, exist_ok=True)
        for name, published in (("report.json", "results.json"), ("results.csv", "results.csv")):
            shutil.copyfile(out_dir / name, target / f"{cfg.data.name}_{published}")
        shutil.copyfile(out_dir / "severity.png", target / f"{cfg.data.name}_severity.png")
        print(f"Published to {target}: {cfg.data.name}_results.json, _results.csv, _severity.png")
    if verdict:
        print(verdict)
    return results


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    main()
