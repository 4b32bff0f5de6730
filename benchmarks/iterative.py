"""Adaptive test-time augmentation and refinement with per-sample halting: compute saved and accuracy kept.

Run: ``.venv/bin/python benchmarks/iterative.py [--reps 3] [--bootstrap 2000] [--data auto|digits|fashion_mnist]
[--subset 3000]``; writes ``benchmarks/results/iterative_<data>.json`` with the run's wall time (``--artefact NAME``
for another name).

Part 1, adaptive TTA on a trained classifier: the CNN of ``recipes/digits.py`` trained on Fashion-MNIST when
Debian's ``dataset-fashion-mnist`` is installed (``--data auto``; 3 epochs, the first ``--subset`` 3,000 test
images, the ``hflip x shift x multiscale`` policy of 30 views: clothing is mirror-symmetric), on scikit-learn's
digits otherwise (40 epochs, the 719 test digits, ``shift x multiscale``, 15 views: digits are not). The model is
trained on random views of its policy, identity first, and evaluated on clean, randomly 1-pixel-shifted and noisy
(Gaussian, std 0.3) test sets with

* ``single``: the identity view alone;
* ``full``: all the policy's views;
* ``adaptive``: the views in order with ``stop=Confidence(0.95)``, halted samples leaving the batch;
* ``adaptive, eager``: the same with ``stop=Confidence(0.99) | Stable(4)``;
* ``same budget``: the first k views for every sample, k = the adaptive policy's mean views rounded up.

For each: forward samples (rows pushed through the model, counted in its forward), wall time (median of ``--reps``
interleaved runs) and error % with a 95% bootstrap interval; for adaptive, the paired bootstrap interval of its
error minus the full policy's.

Part 2, refinement: a damped fixed-point model ``h <- (1 - a) h + a tanh(W h + U x)`` (256 hidden units,
``||W|| = 0.9``, a per-sample step ``a`` in [0.05, 1], digits as input) with
``IterativeInference(mode="refine", stop=Converged(1e-4), max_iters=100)`` against the same with ``stop=None`` (a
fixed 100 iterations) on the same batches: time ratio beside the compute ratio (sum of iterations /
(N x max_iters)), and the rows a batch-level halt (every sample runs until the slowest sample of its batch
converges, as DEQ solvers do) would push.
"""

import math
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))

import argparse

import lightning as L
import torch
from common import Artefact, header, interleaved, load, median, save, setup_threads, table
from digits import digits, quiet, train, trainer
from loaders import FASHION_MNIST_DIR
from loaders import load as load_data
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from tta_demo import test_sets

import ttc_lightning as ttc
from ttc_lightning import stopping

#: The view policy per dataset: no flips of digits, flips of clothing.
POLICIES = {"digits": ["shift", "multiscale"], "fashion_mnist": ["hflip", "shift", "multiscale"]}
EPOCHS = {"digits": 40, "fashion_mnist": 3}
RULE = stopping.Confidence(0.95)
#: A second rule, to show the trade-off: Stable(4) also halts uncertain samples whose prediction stopped changing.
EAGER_RULE = stopping.Confidence(0.99) | stopping.Stable(4)


class Counted(ttc.TestTimeComputeMixin, L.LightningModule):
    """Counts the rows pushed through a network's forward."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x: Tensor) -> Tensor:
        self.rows += len(x)
        return self.net(x)


def bootstrap(errors: Tensor, resamples: int, generator: torch.Generator) -> tuple[float, float]:
    """95% percentile interval of the mean of ``errors`` (per-sample 0/1 or differences), in percent."""
    idx = torch.randint(len(errors), (resamples, len(errors)), generator=generator)
    means = errors[idx].float().mean(1) * 100
    return means.quantile(0.025).item(), means.quantile(0.975).item()


def adaptive_tta(
    model: Counted, policy: list[str], x_test: Tensor, y_test: Tensor, reps: int, resamples: int
) -> list[dict[str, Any]]:
    """One record per test set and policy: forward samples, views, median ms, error % and bootstrap intervals."""
    views = len(ttc.Augmenter(policy))
    adaptive = ttc.TestTimeAugmentation(policy, stop=RULE, return_views=True)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for data, images in test_sets(x_test).items():
        model.rows = 0
        counts = torch.cat([o["views"] for o in _predict(model, images, adaptive)])
        budget = math.ceil(counts.float().mean().item())
        policies: dict[str, list[L.Callback]] = {
            "single": [],
            "full": [ttc.TestTimeAugmentation(policy)],
            "adaptive": [adaptive],
            "adaptive, eager": [ttc.TestTimeAugmentation(policy, stop=EAGER_RULE)],
            f"same budget ({budget})": [first_views(policy, budget)],
        }
        runs = {name: (lambda cbs=cbs, x=images: _logits(model, x, cbs)) for name, cbs in policies.items()}
        times, outputs = interleaved(runs, reps)
        full_wrong = outputs["full"][0].argmax(1) != y_test
        for name, (logits, samples) in outputs.items():
            wrong = logits.argmax(1) != y_test
            row = {
                "data": data,
                "policy": name,
                "samples": len(images),
                "views": views,
                "forward_samples": samples,
                "ms": median(times[name]) * 1000,
                "error": wrong.float().mean().item() * 100,
                "error_95": bootstrap(wrong, resamples, generator),
            }
            if name.startswith("adaptive"):
                row["minus_full_95"] = bootstrap(wrong.float() - full_wrong.float(), resamples, generator)
            rows.append(row)
    return rows


def adaptive_table(rows: list[dict[str, Any]]) -> str:
    """The adaptive-TTA table of ``benchmarks/README.md``."""
    cells = []
    for r in rows:
        low, high = r["error_95"]
        diff = "[{:+.1f}, {:+.1f}]".format(*r["minus_full_95"]) if "minus_full_95" in r else ""
        cells.append(
            [
                r["data"],
                r["policy"],
                r["forward_samples"],
                f"{r['forward_samples'] / r['samples']:.2f}",
                f"{r['views'] * r['samples'] / r['forward_samples']:.2f}x",
                f"{r['ms']:.0f}",
                f"{r['error']:.1f} [{low:.1f}, {high:.1f}]",
                diff,
            ]
        )
    columns = ["data", "policy", "forward samples", "views / sample", "full / this", "ms", "error % [95%]"]
    return table([*columns, "adaptive - full [95%]"], cells)


def summary_table(artefact: Artefact) -> str:
    """The adaptive-TTA summary of ``README.md``: per test set, the adaptive policy against the others."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for r in artefact["results"]["adaptive_tta"]:
        rows.setdefault(r["data"], {})[r["policy"].split(" (")[0]] = r | {"label": r["policy"]}
    cells = []
    for data, by in rows.items():
        a, budget = by["adaptive"], by["same budget"]
        low, high = a["error_95"]
        k = budget["label"].split("(")[1].rstrip(")")
        cells.append(
            [
                data,
                "adaptive, `Confidence(0.95)`" if not cells else "adaptive",
                f"{a['forward_samples'] / a['samples']:.2f}",
                f"{a['views'] * a['samples'] / a['forward_samples']:.2f}x",
                f"{a['error']:.1f} [{low:.1f}, {high:.1f}] (full: {by['full']['error']:.1f})",
                f"{budget['error']:.1f} ({k} views)",
                f"{by['single']['error']:.1f}",
            ]
        )
    columns = ["data", "policy", "views / sample", "full / this", "error %", "same-budget non-adaptive"]
    return table([*columns, "single view"], cells)


def first_views(policy: list[str], k: int) -> ttc.TestTimeAugmentation:
    """The policy's first ``k`` views for every sample (the views of a product cannot be listed as transforms)."""
    tta = ttc.TestTimeAugmentation(policy)
    tta.augmenter.views = tta.augmenter.views[:k]
    return tta


def _predict(model: Counted, images: Tensor, callbacks: list[L.Callback]) -> list:
    return trainer(callbacks).predict(model, DataLoader(TensorDataset(images), batch_size=256))  # type: ignore[return-value]


def _logits(model: Counted, images: Tensor, callbacks: list[L.Callback]) -> tuple[Tensor, int]:
    model.rows = 0
    out = _predict(model, images, callbacks)
    logits = torch.cat([o["prediction"] if isinstance(o, dict) else o for o in out])
    return logits, model.rows


class FixedPoint(Counted):
    """A damped fixed-point iteration ``h <- (1 - a) h + a tanh(W h + U x)`` with ``||W||_2 = 0.9`` and a per-sample
    step ``a = 0.05 + 0.95 sigmoid(g . x)``, so samples converge at different rates; output ``head(h)``."""

    def __init__(self, hidden: int = 256) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Identity())
        self.U, self.W, self.head = nn.Linear(64, hidden), nn.Linear(hidden, hidden, bias=False), nn.Linear(hidden, 10)
        self.gate = nn.Linear(64, 1)
        with torch.no_grad():
            self.W.weight.mul_(0.9 / torch.linalg.matrix_norm(self.W.weight, 2))
            self.gate.weight.mul_(8)
        self.hidden = hidden

    def ttc_init(self, x: Tensor) -> Tensor:
        return x.new_zeros(len(x), self.hidden)

    def ttc_refine(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        self.rows += len(x)
        x = x.flatten(1)
        a = 0.05 + 0.95 * torch.sigmoid(self.gate(x))
        h = (1 - a) * h + a * torch.tanh(self.W(h) + self.U(x))
        return self.head(h), h


def refinement(reps: int, max_iters: int = 100, batch_size: int = 256) -> dict[str, Any]:
    """Halting against a fixed ``max_iters`` on the fixed-point model: iteration counts, rows pushed and times."""
    _, _, x_test, _ = digits()
    model = FixedPoint()
    configs = {
        "fixed": [ttc.IterativeInference("refine", None, max_iters, return_iterations=True)],
        "halting": [ttc.IterativeInference("refine", stopping.Converged(1e-4), max_iters, return_iterations=True)],
    }

    def run(callbacks: list[L.Callback]) -> tuple[Tensor, int]:
        model.rows = 0
        out = trainer(callbacks).predict(model, DataLoader(TensorDataset(x_test), batch_size=batch_size))
        return torch.cat([o["iterations"] for o in out]), model.rows  # type: ignore[index]

    times, outputs = interleaved({name: (lambda cbs=cbs: run(cbs)) for name, cbs in configs.items()}, reps)
    counts, rows = outputs["halting"]
    return {
        "samples": len(x_test),
        "batch_size": batch_size,
        "max_iters": max_iters,
        "iterations": counts.tolist(),
        "rows_pushed": rows,
        "seconds": times,
    }


def refinement_table(r: dict[str, Any]) -> str:
    """The refinement table of ``benchmarks/README.md``."""
    counts, n, max_iters, times = torch.tensor(r["iterations"]), r["samples"], r["max_iters"], r["seconds"]
    batch_level = sum(len(c) * int(c.max()) for c in counts.split(r["batch_size"]))
    ratio = median([h / f for h, f in zip(times["halting"], times["fixed"], strict=True)])
    return table(
        ["what", "value"],
        [
            ["samples, batch size, max_iters", f"{n}, {r['batch_size']}, {max_iters}"],
            [
                "per-sample iterations: mean / min / max",
                f"{counts.float().mean():.1f} / {counts.min()} / {counts.max()}",
            ],
            ["rows pushed: halting (= sum of iterations)", f"{r['rows_pushed']} (= {int(counts.sum())})"],
            ["compute ratio: sum of iterations / (N x max_iters)", f"{r['rows_pushed'] / (n * max_iters):.3f}"],
            ["compute ratio of a batch-level halt (slowest sample per batch)", f"{batch_level / (n * max_iters):.3f}"],
            ["time ratio: halting / fixed (median of paired runs)", f"{ratio:.3f}"],
            [
                "ms: fixed / halting (median)",
                f"{median(times['fixed']) * 1000:.0f} / {median(times['halting']) * 1000:.0f}",
            ],
        ],
    )


def render(artefact: Artefact) -> list[str]:
    """The two tables this benchmark prints (adaptive TTA, refinement), from its artefact."""
    r = artefact["results"]
    return [f"### Adaptive TTA ({r['what']})", adaptive_table(r["adaptive_tta"]), refinement_table(r["refinement"])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--data", choices=("auto", *POLICIES), default="auto", help="auto: Fashion-MNIST if installed")
    parser.add_argument("--subset", type=int, default=3000, help="test images used (Fashion-MNIST has 10,000)")
    parser.add_argument("--artefact", help="results file benchmarks/results/NAME.json (default: iterative_<data>)")
    args = parser.parse_args()
    setup_threads()
    quiet()
    start = load()
    name = args.data if args.data != "auto" else ("fashion_mnist" if os.path.isdir(FASHION_MNIST_DIR) else "digits")
    args.artefact = args.artefact or f"iterative_{name}"
    x_train, y_train, x_test, y_test = load_data(name)
    x_test, y_test = x_test[: args.subset], y_test[: args.subset]
    policy = POLICIES[name]
    views = ttc.Augmenter(policy).views
    model = Counted(train(EPOCHS[name], train_views=views, data=(x_train, y_train)).net).eval()
    what = f"{name} CNN ({EPOCHS[name]} epochs, {len(x_test)} test images), `{' x '.join(policy)}` {len(views)} views"
    results = {
        "data": name,
        "what": f"{what}; adaptive: {RULE!r}, eager: {EAGER_RULE!r}",
        "adaptive_tta": adaptive_tta(model, policy, x_test, y_test, args.reps, args.bootstrap),
        "refinement": refinement(args.reps),
    }
    artefact = save(args, results, start)
    print(header("Iterative inference: adaptive TTA and refinement", artefact))
    heading, part1, part2 = render(artefact)
    print(heading + "\n")
    print(part1)
    print("### Refinement (fixed-point model, `Converged(1e-4)` vs a fixed `max_iters`)\n")
    print(part2)


if __name__ == "__main__":
    main()
