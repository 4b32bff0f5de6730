"""Peak memory of d4 test-time augmentation: one view per forward (chunked) against all views stacked.

Run: ``.venv/bin/python benchmarks/tta_memory.py [--batch-size 64] [--size 64]``; writes
``benchmarks/results/tta_memory.json`` (``--artefact NAME`` for another name).

Each configuration runs in its own subprocess (this script with ``--child NAME``), so peaks do not mix. The child
builds the model (the convnet without max-pools, so activations dominate) and the input, runs a warm-up forward of
the same configuration at batch size 1 (allocator, thread pool and kernels exist), reads
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` as its baseline, runs the configuration once at full batch size
under ``torch.inference_mode`` and reads ``ru_maxrss`` again. The table reports peak minus baseline (the memory the
forward needed on top of an idle process), in MB.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import ttach
from common import Artefact, add_artefact_option, convnet, header, load, save, setup_threads, table
from torch import Tensor, nn

import ttc_lightning as ttc

#: Configuration name -> description.
CONFIGS: dict[str, str] = {
    "plain": "plain model, 1 view (reference)",
    "chunked": "ttc d4 mean, chunk_size=1",
    "stacked": "ttc d4 mean, chunk_size=None (8 views in one forward)",
    "median_chunked": "ttc d4 median, chunk_size=1 (keeps all view outputs)",
    "median_stacked": "ttc d4 median, chunk_size=None",
    "ttach": "ttach ClassificationTTAWrapper d4 mean (loop over views)",
}


def build(name: str, net: nn.Module) -> nn.Module:
    """The module a configuration runs."""
    if name == "plain":
        return net
    if name == "ttach":
        return ttach.ClassificationTTAWrapper(net, ttach.aliases.d4_transform(), merge_mode="mean")
    merge, chunk = name.split("_") if "_" in name else ("mean", name)
    return ttc.TTAWrapper(net, transforms="d4", merge=merge, chunk_size=1 if chunk == "chunked" else None)


def max_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(name: str, batch: int, size: int) -> None:
    """Measure one configuration and print a JSON line with baseline, peak and time."""
    setup_threads()
    torch.manual_seed(0)
    model = build(name, convnet(downsample=False)).eval()
    x: Tensor = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        model(x[:1])
        baseline = max_rss_mb()
        start = time.perf_counter()
        out = model(x)
        seconds = time.perf_counter() - start
        peak = max_rss_mb()
    assert out.shape == (batch, 10)
    print(json.dumps({"baseline": baseline, "peak": peak, "seconds": seconds}))


def render(artefact: Artefact) -> list[str]:
    """The table and the ratio line this benchmark prints, from its artefact."""
    results = artefact["results"]
    chunked = results["chunked"]["peak"] - results["chunked"]["baseline"]
    rows = []
    for name, description in CONFIGS.items():
        r = results[name]
        extra = r["peak"] - r["baseline"]
        rows.append([name, description, f"{r['baseline']:.0f}", f"{extra:.0f}", f"{extra / chunked:.2f}", r["seconds"]])
    stacked = results["stacked"]["peak"] - results["stacked"]["baseline"]
    return [
        table(["config", "what", "baseline MB", "peak - baseline MB", "vs chunked", "forward s"], rows),
        f"Stacked / chunked peak memory: {stacked / chunked:.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="image side")
    parser.add_argument("--child", choices=list(CONFIGS), help=argparse.SUPPRESS)
    add_artefact_option(parser, "tta_memory")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.batch_size, args.size)
        return
    start_load = load()
    setup_threads()
    results: dict[str, Any] = {}
    for name in CONFIGS:
        command = [sys.executable, os.path.abspath(__file__), "--child", name]
        command += ["--batch-size", str(args.batch_size), "--size", str(args.size)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    del args.child
    artefact = save(args, results, start_load)
    one_view = 4 * args.batch_size * 128 * args.size**2 / 2**20  # the largest activation of one view, fp32
    print(header("TTA memory: d4 peak memory, chunked vs stacked views", artefact))
    print(
        f"Model: 3 conv blocks (32-64-128, BN+ReLU, no downsampling), global pool, linear 10; batch "
        f"{args.batch_size} x 3x{args.size}x{args.size}, fp32, CPU, inference_mode. Peak = ru_maxrss after the "
        f"forward minus ru_maxrss after a batch-1 warm-up, each configuration in its own process. One view's "
        f"largest activation (128 channels) is {one_view:.0f} MB.\n"
    )
    print("\n".join(render(artefact)))


if __name__ == "__main__":
    main()
