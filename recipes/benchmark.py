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
* ``results.csv``: every method, corruption and severity with error %, NLL and ECE;
* ``severity.png``: mean error over the corruptions against severity, one line per method;
* ``model.ckpt``'s path in the log, for ``recipes/predict.py ckpt_path=...``.
"""

import hashlib
import json
import math
import os
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

from ttc_lightning.data import CORRUPTIONS, Shift, stream

register()
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


def evaluate(
    model: L.LightningModule, callbacks: list[DictConfig], segments: list[Shift], cfg: DictConfig, batch_size: int
) -> list[dict[str, Any]]:
    """Error %, NLL and ECE of one method on every segment; one ``trainer.predict`` per run of segments."""
    rows = []
    for run in runs(segments):
        strategies = [instantiate(node) for node in callbacks]
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


def markdown(results: dict[str, dict[str, float]], calibration: dict[str, tuple[float, float]] | None = None) -> str:
    """The results table: methods as rows; clean, corruptions, mean (and NLL, ECE when given) as columns."""
    columns = list(dict.fromkeys(k for r in results.values() for k in r if k not in ("clean", "mean")))
    head = ["method", "clean", *(SHORT.get(c, c) for c in columns), "mean", *(["NLL", "ECE %"] if calibration else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in results.items():
        cells = [r.get("clean", math.nan), *(r.get(c, math.nan) for c in columns), r["mean"]]
        row = f"| {method} | " + " | ".join(f"{v:.1f}" for v in cells) + " |"
        if calibration:
            nll, ece = calibration[method]
            row += f" {nll:.3f} | {ece:.1f} |"
        lines.append(row)
    return "\n".join(lines)


def plot(rows: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Mean error over the corruptions against severity, one line per method."""
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
        ax.plot(xs, [sum(by_severity[s]) / len(by_severity[s]) for s in xs], marker="o", label=method)
    ax.set_xlabel("severity")
    ax.set_ylabel("error % (mean over corruptions)")
    ax.set_xticks(range(1, 6))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@hydra.main(config_path="../configs", config_name="benchmark", version_base=None)
def main(cfg: DictConfig) -> dict[str, dict[str, float]]:
    quiet()
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    methods = compositions(cfg)
    x_train, y_train, x_test, y_test = load(cfg.data.name)
    model, checkpoint = train_source(cfg, x_train, y_train)
    if cfg.subset is not None:
        x_test, y_test = x_test[: cfg.subset], y_test[: cfg.subset]
    corruptions = CORRUPTIONS if cfg.corruptions == "all" else tuple(cfg.corruptions)
    segments = [Shift("clean", 0, x_test, y_test, True)]
    segments += stream(x_test, y_test, corruptions, tuple(cfg.severities), cfg.stream, cfg.seed)
    print(f"{len(methods)} method(s) x {len(segments)} segments of {len(x_test)} samples ({cfg.stream} stream)")
    rows: dict[str, list[dict[str, Any]]] = {}
    for method, callbacks in methods.items():
        batch_size = cfg.batch_sizes.get(method, cfg.data.batch_size)
        start = time.perf_counter()
        rows[method] = evaluate(model, list(callbacks), segments, cfg, batch_size)
        mean = summary(rows[method], cfg.table_severity)["mean"]
        print(f"  {method}: mean error {mean:.1f} % ({time.perf_counter() - start:.0f} s)", flush=True)
    results = {method: summary(method_rows, cfg.table_severity) for method, method_rows in rows.items()}
    severity = cfg.table_severity
    shifted = {m: [r for r in v if r["corruption"] != "clean" and r["severity"] == severity] for m, v in rows.items()}
    calibration = {
        m: (sum(r["nll"] for r in v) / max(len(v), 1), sum(r["ece"] for r in v) / max(len(v), 1) * 100)
        for m, v in shifted.items()
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    with open(out_dir / "results.csv", "w") as f:
        f.write("method,corruption,severity,error,nll,ece\n")
        for m, method_rows in rows.items():
            for r in method_rows:
                f.write(f"{m},{r['corruption']},{r['severity']},{r['error']:.3f},{r['nll']:.5f},{r['ece']:.5f}\n")
    plot(rows, out_dir / "severity.png")
    print(f"\nError % at severity {cfg.table_severity} ({cfg.data.name}, {cfg.stream} stream, {len(x_test)} samples; ")
    print("NLL and ECE: means over the corruptions at that severity)\n")
    print(markdown(results, calibration))
    print(f"\nSource checkpoint: {checkpoint}\nWritten to {out_dir}: results.json, results.csv, severity.png")
    return results


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    main()
