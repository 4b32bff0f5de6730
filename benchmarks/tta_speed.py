"""Speed of d4 test-time augmentation through ``Trainer.predict`` against a plain predict and against ttach.

Run: ``.venv/bin/python benchmarks/tta_speed.py [--batches 20] [--batch-size 64] [--reps 7] [--device cpu]``; writes
``benchmarks/results/tta_speed.json`` (``--artefact NAME`` for another name).

Configurations, timed interleaved (one of each per repetition) after one warm-up run each; times are medians (and
minimums, less sensitive to other processes competing for the cores); a ratio is the median over repetitions of the
ratio of two configurations timed back to back, so slow periods of the machine cancel:

* A: ``Trainer.predict`` of a ``TestTimeComputeMixin`` model, no callbacks (1 forward per batch);
* B: ``Trainer.predict`` with ``TestTimeAugmentation(transforms="d4", merge="mean")`` (``chunk_size="auto"``);
* B2: as B with ``chunk_size=None`` (all 8 views stacked into one forward);
* C: ttach's ``ClassificationTTAWrapper(model, d4_transform(), merge_mode="mean")`` in a loop, no Trainer;
* D: the plain model in a loop, no Trainer (A - D is the Trainer's overhead);
* E: ``ttc.TTAWrapper(model, transforms="d4")`` in a loop, no Trainer (the same core as B, compared with C).

Goals: B/A <= 8.4 (at most 5% over 8 forwards) and B/C <= 1.0 (no slower than ttach).
"""

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import ttach
from common import (
    Artefact,
    header,
    interleaved,
    load,
    median,
    save,
    speed_arguments,
    speed_workload,
    table,
    trainer,
)
from torch import Tensor, nn

import ttc_lightning as ttc

LABELS = {
    "A": "Trainer.predict, no callback",
    "B": "Trainer.predict + TestTimeAugmentation d4 (chunk_size='auto')",
    "B2": "Trainer.predict + TestTimeAugmentation d4 (chunk_size=None)",
    "C": "ttach ClassificationTTAWrapper d4 loop",
    "D": "plain model loop",
    "E": "ttc.TTAWrapper d4 loop (chunk_size='auto')",
}


def loop(model: nn.Module, batches: list[Tensor], device: str) -> list[Tensor]:
    """``model`` over ``batches`` under ``torch.inference_mode``, moving each batch to ``device``."""
    with torch.inference_mode():
        return [model(x.to(device)) for x in batches]


def render(artefact: Artefact) -> list[str]:
    """The tables and the difference line this benchmark prints, from its artefact."""
    args, times = artefact["arguments"], artefact["results"]["seconds"]
    t = {name: median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}
    images = args["batches"] * args["batch_size"]
    rows = [
        [name, LABELS[name], t[name], best[name], f"{1e3 * t[name] / args['batches']:.1f}", f"{images / t[name]:.0f}"]
        for name in times
    ]
    speeds = table(["config", "what", "median s", "min s", "ms / batch (median)", "images / s (median)"], rows)

    def ratio(a: str, b: str) -> tuple[float, float]:
        """Median of the per-repetition ratios (a and b ran back to back) and the ratio of the minimums."""
        paired = [x / y for x, y in zip(times[a], times[b], strict=True)]
        return median(paired), best[a] / best[b]

    def goal(a: str, b: str, limit: float) -> list[object]:
        value, low = ratio(a, b)
        return [f"{a}/{b}", value, low, f"<= {limit}", "PASS" if value <= limit else "MISS"]

    ratios = [
        goal("B", "A", 8.4),
        goal("B", "C", 1.0),
        ["B2/A", *ratio("B2", "A"), "", ""],
        ["B2/C", *ratio("B2", "C"), "", ""],
        ["C/D (ttach over 1 forward)", *ratio("C", "D"), "", ""],
        ["E/C (ttc core vs ttach, both without Trainer)", *ratio("E", "C"), "", ""],
        ["E/D (ttc core over 1 forward)", *ratio("E", "D"), "", ""],
        ["B/E (Trainer + callback over ttc core)", *ratio("B", "E"), "", ""],
        ["A/D (Trainer over plain loop)", *ratio("A", "D"), "", ""],
    ]
    diffs = artefact["results"]["max_difference_from_ttach"]
    return [
        speeds,
        table(["ratio", "median of paired", "of minimums", "goal", "median vs goal"], ratios),
        "Max |difference| from ttach's output: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()),
    ]


def main() -> None:
    start_load = load()
    args = speed_arguments(__doc__.splitlines()[0], "tta_speed")
    device = args.device
    net, batches, loader, lit = speed_workload(args)
    ttach_model = ttach.ClassificationTTAWrapper(net, ttach.aliases.d4_transform(), merge_mode="mean").eval()
    ttc_model = ttc.TTAWrapper(net, transforms="d4", merge="mean").eval()

    def predict(*callbacks: ttc.TestTimeAugmentation) -> list[Tensor]:
        return trainer(callbacks, device).predict(lit, dataloaders=loader)  # type: ignore[return-value]

    # Trainers are built inside the timed call (cheap next to predict); a fresh one per run avoids any state carried
    # across runs.
    configs = {
        "A": lambda: predict(),
        "B": lambda: predict(ttc.TestTimeAugmentation(transforms="d4", merge="mean")),
        "B2": lambda: predict(ttc.TestTimeAugmentation(transforms="d4", merge="mean", chunk_size=None)),
        "C": lambda: loop(ttach_model, batches, device),
        "D": lambda: loop(net, batches, device),
        "E": lambda: loop(ttc_model, batches, device),
    }
    times, warm = interleaved(configs, args.reps, device)
    # Sanity: the TTA paths agree with ttach (mean of raw logits over the same 8 views).
    outputs = {name: torch.cat(value).cpu() for name, value in warm.items()}  # type: ignore[arg-type]
    diffs = {name: (outputs[name] - outputs["C"]).abs().max().item() for name in ("B", "B2", "E")}
    results: dict[str, Any] = {"seconds": times, "max_difference_from_ttach": diffs}
    artefact = save(args, results, start_load, device)
    print(header("TTA speed: d4, mean merge", artefact))
    print(
        f"Model: 3 conv blocks (32-64-128, BN+ReLU, max-pool after blocks 1-2), global pool, linear 10; "
        f"{args.batches} batches of {args.batch_size} x 3x{args.size}x{args.size} on {device}; "
        f"median of {args.reps} interleaved repetitions after one warm-up.\n"
    )
    print("\n".join(render(artefact)))


if __name__ == "__main__":
    main()
