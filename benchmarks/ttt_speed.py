"""Speed of test-time training through ``Trainer.predict``: Tent against a plain predict and a bare-torch TENT loop,
and how many backward passes EATA's filters save.

Run: ``.venv/bin/python benchmarks/ttt_speed.py [--batches 20] [--batch-size 64] [--reps 7] [--device cpu]``; writes
``benchmarks/results/ttt_speed.json`` (``--artefact NAME`` for another name).

Configurations, timed interleaved with the order rotated each repetition (see ``common.interleaved``):

* A: ``Trainer.predict`` of a ``TestTimeComputeMixin`` model, no callbacks;
* B: ``Trainer.predict`` with ``ttc.Tent`` (Adam, lr 1e-3, steps=1);
* C: the authors' TENT algorithm written as a bare torch loop (BatchNorm2d in train mode without running statistics,
  affine parameters only, forward / entropy / backward / step / zero_grad), no Trainer;
* D: ``Trainer.predict`` with ``ttc.EATA`` (same optimizer), whose filters skip some backward passes.

Goals: B/A in the 2-3x floor of one forward + one backward per batch; B/C <= 1.10 (within 10% of bare torch).
The backward passes EATA saves depend on the data, so they are counted on a real shift: the digits CNN of
``recipes/digits.py`` on blurred test digits (batch 64), against Tent's one backward per batch.
"""

import copy
import functools
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes"))

import torch
import torch.nn.functional as F
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
from digits import digits, predict, quiet, train
from torch import Tensor, nn

import ttc_lightning as ttc

ADAM = functools.partial(torch.optim.Adam, lr=1e-3)
LABELS = {
    "A": "Trainer.predict, no callback",
    "B": "Trainer.predict + Tent (Adam 1e-3, steps=1)",
    "C": "bare-torch TENT loop (tent.py), no Trainer",
    "D": "Trainer.predict + EATA (Adam 1e-3)",
}


def tent_loop(net: nn.Module, batches: list[Tensor], device: str) -> list[Tensor]:
    """TENT as in the authors' tent.py (dropout-free model, so train mode only affects BatchNorm)."""
    model = copy.deepcopy(net)
    model.train()
    model.requires_grad_(False)
    params = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
            params += [m.weight, m.bias]
    optimizer = ADAM(params)
    outputs = []
    for x in batches:
        out = model(x.to(device))
        loss = -(out.softmax(1) * out.log_softmax(1)).sum(1).mean(0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        outputs.append(out.detach())
    return outputs


def render(artefact: Artefact) -> list[str]:
    """The tables and the difference line this benchmark prints, from its artefact."""
    args, r = artefact["arguments"], artefact["results"]
    times = r["seconds"]
    t = {name: median(values) for name, values in times.items()}
    rows = [[name, LABELS[name], t[name], min(times[name]), f"{1e3 * t[name] / args['batches']:.1f}"] for name in times]

    def ratio(a: str, b: str) -> float:
        return median([x / y for x, y in zip(times[a], times[b], strict=True)])

    ratios = [
        ["B/A", ratio("B", "A"), "2-3 (one forward + one backward)"],
        ["B/C", ratio("B", "C"), "<= 1.10"],
        ["D/B", ratio("D", "B"), ""],
    ]
    eata = [[m["method"], f"{m['error']:.1f}", m["backward_passes"]] for m in r["blurred_digits"]]
    return [
        table(["config", "what", "median s", "min s", "ms / batch (median)"], rows),
        table(["ratio", "median of paired", "goal"], ratios),
        f"Max |difference| between Tent's predictions and the bare loop's: {r['max_difference_tent_bare']:.2e}",
        table(["method", "error %", "backward passes / batches"], eata),
    ]


def main() -> None:
    start_load = load()
    args = speed_arguments(__doc__.splitlines()[0], "ttt_speed")
    device = args.device
    net, batches, loader, lit = speed_workload(args)

    def predict(*callbacks: ttc.TestTimeCallback) -> list[Tensor]:
        return trainer(callbacks, device).predict(lit, dataloaders=loader)  # type: ignore[return-value]

    configs = {
        "A": lambda: predict(),
        "B": lambda: predict(ttc.Tent(optimizer=ADAM)),
        "C": lambda: tent_loop(net, batches, device),
        "D": lambda: predict(ttc.EATA(optimizer=ADAM)),
    }
    times, warm = interleaved(configs, args.reps, device)
    difference = (torch.cat(warm["B"]).cpu() - torch.cat(warm["C"]).cpu()).abs().max().item()  # type: ignore[arg-type]
    results: dict[str, Any] = {
        "seconds": times,
        "max_difference_tent_bare": difference,
        "blurred_digits": eata_backward_passes(),
    }
    artefact = save(args, results, start_load, device)
    print(header("TTT speed: Tent and EATA", artefact))
    print(
        f"Model: 3 conv blocks (32-64-128, BN+ReLU, max-pool after blocks 1-2), global pool, linear 10; "
        f"{args.batches} batches of {args.batch_size} x 3x{args.size}x{args.size} on "
        f"{device}; median of {args.reps} interleaved repetitions after one warm-up.\n"
    )
    speeds, ratios, difference_line, eata = render(artefact)
    print(speeds)
    print(ratios)
    print(difference_line + "\n")
    print("Blurred digits (719 images, batch 64): backward passes per batch and error\n")
    print(eata)


def eata_backward_passes() -> list[dict[str, Any]]:
    """Backward passes of EATA and Tent on blurred digits (a real shift), with the error of each."""
    quiet()
    model = train(epochs=10)
    _, _, images, labels = digits()
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, 1)
    rows = []
    methods = [
        ("source", None),
        ("tent", ttc.Tent(optimizer=ADAM)),
        ("eata (d_margin 0.05)", ttc.EATA(optimizer=ADAM)),
        ("eata (d_margin 0.4)", ttc.EATA(optimizer=ADAM, d_margin=0.4)),
    ]
    for name, callback in methods:
        logits = predict(model, blurred, [callback] if callback else [])
        error = (logits.argmax(1) != labels).float().mean().item() * 100
        passes = "" if callback is None else f"{callback.backwards} / {callback.batches_seen}"
        rows.append({"method": name, "error": error, "backward_passes": passes})
    return rows


if __name__ == "__main__":
    main()
