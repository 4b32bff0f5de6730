"""MEMO in its paper's protocol, one test point at a time, on a fixed subset of the main benchmark's stream.

    .venv/bin/python benchmarks/memo_bs1.py      # writes benchmarks/results/memo_bs1.json, prints the summary

The main job (``recipes/benchmark.py``) runs MEMO at batch 16: the full stream at batch size 1 does not fit its
time. This script takes the benchmark's source model (same cache), its MEMO config and its stream at
``table_severity`` (clean + the 15 corruptions, every shift from the source model), keeps the first
:data:`SUBSET` images of every segment (the same corrupted images the main job sees there), and runs on them the
source model, MEMO at batch 1 and MEMO at the main job's batch size, so that the three are compared on the same
images. Error % per segment and the mean over the corruptions go to ``benchmarks/results/memo_bs1.json``.
"""

import json
import sys
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import benchmark  # noqa: E402  (the recipes' folder, put on the path above)
from loaders import load  # noqa: E402
from select_hparams import config  # noqa: E402

from ttc_lightning.data import CORRUPTIONS, Shift, stream  # noqa: E402

#: Images kept from the start of every segment.
SUBSET = 100
ARTEFACT = ROOT / "benchmarks" / "results" / "memo_bs1.json"


def run(overrides: list[str]) -> dict[str, Any]:
    """Error % of the source model, MEMO at batch 1 and MEMO at the benchmark's batch size on the subset."""
    cfg = config(overrides)
    benchmark.setup(cfg)
    x_train, y_train, x_test, y_test = load(cfg.data.name)
    model, checkpoint = benchmark.train_source(cfg, x_train, y_train)
    severity = cfg.table_severity
    full = [Shift("clean", 0, x_test, y_test, True)]
    full += stream(x_test, y_test, CORRUPTIONS, (severity,), cfg.stream, cfg.seed)
    segments = [Shift(s.name, s.severity, s.images[:SUBSET], s.labels[:SUBSET], s.reset) for s in full]
    benchmark_batch = cfg.batch_sizes.get("memo", cfg.data.batch_size)
    settings = {"source": ([], benchmark_batch), "memo_bs1": ([cfg.suite.memo], 1)}
    settings[f"memo_bs{benchmark_batch}"] = ([cfg.suite.memo], benchmark_batch)
    errors: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for name, (callbacks, batch_size) in settings.items():
        start = time.perf_counter()
        rows = benchmark.evaluate(model, callbacks, segments, cfg, batch_size)
        seconds[name] = round(time.perf_counter() - start, 1)
        errors[name] = benchmark.summary(rows, severity)
        mean, clean = errors[name]["mean"], errors[name]["clean"]
        print(f"  {name}: mean error {mean:.1f} %, clean {clean:.1f} % ({seconds[name]:.0f} s)", flush=True)
    return {
        "subset": SUBSET,
        "severity": severity,
        "stream": cfg.stream,
        "benchmark_batch_size": benchmark_batch,
        "memo": OmegaConf.to_container(cfg.suite.memo, resolve=True),
        "source_checkpoint": Path(checkpoint).name,
        "seconds_per_setting": seconds,
        "results": errors,
    }


def render(artefact: dict[str, Any]) -> str:
    """One README sentence from the artefact."""
    r, b = artefact["results"], artefact["benchmark_batch_size"]
    return (
        f"MEMO at batch 1 (its paper's protocol) on the first {artefact['subset']} test digits of every segment "
        f"(`benchmarks/memo_bs1.py`, `benchmarks/results/memo_bs1.json`, run of {artefact['date'][:10]}): mean "
        f"error {r['memo_bs1']['mean']:.1f} % over the 15 corruptions at severity {artefact['severity']}, clean "
        f"{r['memo_bs1']['clean']:.1f} %; on the same images MEMO at batch {b} gives {r[f'memo_bs{b}']['mean']:.1f} % "
        f"(clean {r[f'memo_bs{b}']['clean']:.1f} %) and the source model {r['source']['mean']:.1f} % (clean "
        f"{r['source']['clean']:.1f} %)."
    )


def main() -> None:
    overrides = sys.argv[1:]
    started = (time.perf_counter(), benchmark.load_average())
    results = run(overrides)
    artefact = {
        **benchmark.provenance("benchmarks/memo_bs1.py", overrides, started),
        **results,
    }
    if overrides:
        print("Overrides given: not written to benchmarks/results/ (the artefact is the default run's).")
    else:
        ARTEFACT.write_text(json.dumps(artefact, indent=1) + "\n")
        print(f"Written to {ARTEFACT.relative_to(ROOT)}")
    print(render(artefact))


if __name__ == "__main__":
    main()
