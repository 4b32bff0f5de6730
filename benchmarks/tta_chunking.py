"""Views per forward (``chunk_size``) for d4 test-time augmentation: the measurement behind ``chunk_size="auto"``.

Run: ``.venv/bin/python benchmarks/tta_chunking.py [--reps 7] [--images 256] [--size 32] [--no-downsample]
[--device cpu] [--threads N]``; writes ``benchmarks/results/tta_chunking.json`` (``--artefact NAME`` for another name).

Times the :class:`~ttc_lightning.Augmenter` core (the code ``TestTimeAugmentation`` runs inside ``predict_step``) on
the small convnet under ``torch.inference_mode``, with ``chunk_size`` 1, 2, 4 and ``None`` (all 8 d4 views in one
forward) at batch sizes 8, 64 and 256 on 3x32x32 inputs. Each measurement pushes the same number of images
(``--images``) through, so rows are comparable; repetitions are interleaved (every batch size and chunk size once
per repetition) and medians reported, relative to ``chunk_size=1``.
"""

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
from common import Artefact, add_artefact_option, convnet, header, interleaved, load, median, save, setup_threads, table
from torch import Tensor, nn

import ttc_lightning as ttc

CHUNKS: tuple[int | None, ...] = (1, 2, 4, None)
BATCHES = (8, 64, 256)


def run(augmenter: ttc.Augmenter, net: nn.Module, batches: list[Tensor]) -> None:
    """Run ``augmenter`` around ``net`` on every batch, discarding the merged outputs."""
    with torch.inference_mode():
        for x in batches:
            augmenter(net, x)


def key(batch: int, chunk: int | None) -> str:
    """The artefact's name of a measurement: ``"<batch>x<chunk>"``, chunk ``None`` for all views stacked."""
    return f"{batch}x{chunk}"


def render(artefact: Artefact) -> list[str]:
    """The table and the fastest-chunk line this benchmark prints, from its artefact."""
    times, images = artefact["results"]["seconds"], artefact["arguments"]["images"]
    t = {k: median(values) for k, values in times.items()}
    best = {k: min(values) for k, values in times.items()}
    rows = []
    for b in BATCHES:
        base, low = t[key(b, 1)], best[key(b, 1)]
        cells = [f"{t[key(b, c)] / base:.2f} ({best[key(b, c)] / low:.2f})" for c in CHUNKS]
        rows.append([b, f"{1e3 * base / images:.3f}", *cells])
    fastest = {b: min(CHUNKS, key=lambda c, b=b: t[key(b, c)]) for b in BATCHES}
    names = ["1", "2", "4", "8 (None)"]
    return [
        table(["batch", "ms / image (chunk 1)", *(f"chunk {n}" for n in names)], rows),
        "Fastest chunk_size per batch size (median): " + ", ".join(f"{b}: {c}" for b, c in fastest.items()),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--images", type=int, default=256, help="images per measurement (a multiple of 256)")
    parser.add_argument("--size", type=int, default=32, help="image side")
    parser.add_argument("--no-downsample", action="store_true", help="convnet without max-pools (heavier)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: one per usable core)")
    add_artefact_option(parser, "tta_chunking")
    args = parser.parse_args()
    device, start_load = args.device, load()
    setup_threads()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be an integer >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = convnet(downsample=not args.no_downsample).to(device).eval()
    shape = (3, args.size, args.size)
    data = {b: [torch.randn(b, *shape, device=device) for _ in range(args.images // b)] for b in BATCHES}
    augmenters = {c: ttc.Augmenter(transforms="d4", merge="mean", chunk_size=c) for c in CHUNKS}
    configs = {key(b, c): functools.partial(run, augmenters[c], net, data[b]) for b in BATCHES for c in CHUNKS}
    times, _ = interleaved(configs, args.reps, device)
    artefact = save(args, {"seconds": times}, start_load, device)

    print(header("TTA chunking: d4 views per forward", artefact))
    model = "without max-pools" if args.no_downsample else "max-pool after blocks 1-2"
    print(
        f"Model: 3 conv blocks (32-64-128, BN+ReLU, {model}), global pool, linear 10; {args.images} images of "
        f"3x{args.size}x{args.size} per measurement on {device}; Augmenter d4 mean under inference_mode; median "
        f"(and min) of {args.reps} interleaved repetitions after one warm-up. chunk_size=8 is None (stacked).\n"
    )
    print("Time relative to chunk_size=1, median (min in brackets); ms / image is the chunk_size=1 median.\n")
    print("\n".join(render(artefact)))


if __name__ == "__main__":
    main()
