"""Speed of d4 test-time augmentation through ``Trainer.predict`` against a plain predict and against ttach.

Run: ``.venv/bin/python benchmarks/tta_speed.py [--batches 20] [--batch-size 64] [--reps 5] [--device cpu]``

Configurations, timed interleaved (one of each per repetition) after one warm-up run each; medians reported:

* A: ``Trainer.predict`` of a ``TestTimeComputeMixin`` model, no callbacks (1 forward per batch);
* B: ``Trainer.predict`` with ``TestTimeAugmentation(transforms="d4", merge="mean")`` (``chunk_size="auto"``);
* B2: as B with ``chunk_size=None`` (all 8 views stacked into one forward);
* C: ttach's ``ClassificationTTAWrapper(model, d4_transform(), merge_mode="mean")`` in a loop, no Trainer;
* D: the plain model in a loop, no Trainer (A - D is the Trainer's overhead);
* E: ``ttc.TTAWrapper(model, transforms="d4")`` in a loop, no Trainer (the same core as B, compared with C).

Goals: B/A <= 8.4 (at most 5% over 8 forwards) and B/C <= 1.0 (no slower than ttach).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import ttach
from common import LitConvNet, convnet, header, interleaved, median, setup_threads, table, trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

import ttc_lightning as ttc


def loop(model: nn.Module, batches: list[Tensor], device: str) -> list[Tensor]:
    """``model`` over ``batches`` under ``torch.inference_mode``, moving each batch to ``device``."""
    with torch.inference_mode():
        return [model(x.to(device)) for x in batches]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    args = parser.parse_args()
    device = args.device
    setup_threads()
    torch.manual_seed(0)
    net = convnet(downsample=True).to(device).eval()
    batches = [torch.randn(args.batch_size, 3, args.size, args.size) for _ in range(args.batches)]
    loader = DataLoader(batches, batch_size=None)  # yields the prepared batches as they are: no collation
    lit = LitConvNet(net)
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
    # Sanity: the TTA paths agree with ttach (mean of raw logits over the same 8 views).
    reference = torch.cat(loop(ttach_model, batches, device)).cpu()
    diffs = {name: (torch.cat(configs[name]()).cpu() - reference).abs().max().item() for name in ("B", "B2", "E")}

    times = interleaved(configs, args.reps, device)
    t = {name: median(values) for name, values in times.items()}
    labels = {
        "A": "Trainer.predict, no callback",
        "B": "Trainer.predict + TestTimeAugmentation d4 (chunk_size='auto')",
        "B2": "Trainer.predict + TestTimeAugmentation d4 (chunk_size=None)",
        "C": "ttach ClassificationTTAWrapper d4 loop",
        "D": "plain model loop",
        "E": "ttc.TTAWrapper d4 loop (chunk_size='auto')",
    }
    images = args.batches * args.batch_size
    print(header("TTA speed: d4, mean merge", device))
    print(
        f"Model: 3 conv blocks (32-64-128, BN+ReLU, max-pool after blocks 1-2), global pool, linear 10; "
        f"{args.batches} batches of {args.batch_size} x 3x{args.size}x{args.size} on {device}; "
        f"median of {args.reps} interleaved repetitions after one warm-up.\n"
    )
    rows = [
        [name, labels[name], t[name], f"{1e3 * t[name] / args.batches:.2f}", f"{images / t[name]:.0f}"]
        for name in configs
    ]
    print(table(["config", "what", "median s", "ms / batch", "images / s"], rows))
    ratios = [
        ["B/A", t["B"] / t["A"], "<= 8.4", "PASS" if t["B"] / t["A"] <= 8.4 else "MISS"],
        ["B/C", t["B"] / t["C"], "<= 1.0", "PASS" if t["B"] / t["C"] <= 1.0 else "MISS"],
        ["B2/A", t["B2"] / t["A"], "", ""],
        ["B2/C", t["B2"] / t["C"], "", ""],
        ["C/D (ttach over 1 forward)", t["C"] / t["D"], "", ""],
        ["E/C (ttc core vs ttach, both without Trainer)", t["E"] / t["C"], "", ""],
        ["E/D (ttc core over 1 forward)", t["E"] / t["D"], "", ""],
        ["(A-D)/batch ms (Trainer overhead)", 1e3 * (t["A"] - t["D"]) / args.batches, "", ""],
        ["(B-E)/batch ms (Trainer + callback overhead)", 1e3 * (t["B"] - t["E"]) / args.batches, "", ""],
    ]
    print(table(["ratio", "value", "goal", ""], ratios))
    print("Max |difference| from ttach's output: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


if __name__ == "__main__":
    main()
