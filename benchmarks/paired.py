"""Benchmark ratios of two source trees, measured in paired runs: did a refactor change any ratio?

Runs ``tta_speed.py``, ``ttt_speed.py`` and ``tta_memory.py`` of each tree (``--before`` and ``--after``, e.g. a
``git worktree`` of the old commit and the checkout), each with its own ``ttc_lightning`` (``PYTHONPATH`` set to the
tree), alternating the trees within every round and swapping which goes first from one round to the next, so slow
periods of a shared machine hit both alike. Each run's ratios come from its own artefact (the median over its
repetitions of the per-repetition ratio, for times; the ratio of peak-minus-baseline, for memory); the table gives the
median over rounds per tree and the relative change.

    .venv/bin/python benchmarks/paired.py --before ../old --after . --rounds 2
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

from common import Artefact, header, load, read, save, table

#: benchmark script -> its arguments in a paired run (smaller than the defaults: several rounds must fit).
SCRIPTS = {
    "tta_speed": ["--batches", "4", "--batch-size", "32", "--reps", "5"],
    "ttt_speed": ["--batches", "4", "--batch-size", "32", "--reps", "5"],
    "tta_memory": [],
}
#: benchmark -> ratios (numerator, denominator) compared.
RATIOS = {
    "tta_speed": [("B", "A"), ("B", "C"), ("B2", "A"), ("E", "C"), ("E", "D")],
    "ttt_speed": [("B", "A"), ("B", "C"), ("D", "B")],
    "tta_memory": [("chunked", "plain"), ("stacked", "plain"), ("median_chunked", "plain"), ("ttach", "plain")],
}
#: The largest relative change of a ratio the redesign may cause (issue 11).
TOLERANCE = 0.05


def ratios(name: str, results: dict[str, Any]) -> dict[str, float]:
    """The compared ratios of one run of benchmark ``name``."""
    out = {}
    for top, bottom in RATIOS[name]:
        if name == "tta_memory":
            used = {k: results[k]["peak"] - results[k]["baseline"] for k in (top, bottom)}
            out[f"{top}/{bottom}"] = used[top] / used[bottom]
        else:
            times = results["seconds"]
            out[f"{top}/{bottom}"] = statistics.median(a / b for a, b in zip(times[top], times[bottom], strict=True))
    return out


def run(tree: str, name: str) -> dict[str, float]:
    """Run benchmark ``name`` of ``tree`` with its own package; return its ratios."""
    tree = os.path.abspath(tree)
    artefact = "paired_run"
    command = [sys.executable, os.path.join(tree, "benchmarks", f"{name}.py"), *SCRIPTS[name], "--artefact", artefact]
    subprocess.run(command, check=True, cwd=tree, env={**os.environ, "PYTHONPATH": tree}, capture_output=True)
    path = os.path.join(tree, "benchmarks", "results", f"{artefact}.json")
    with open(path) as f:
        results = json.load(f)["results"]
    os.remove(path)
    return ratios(name, results)


def revision(tree: str) -> str:
    """The commit checked out in ``tree``."""
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()


def render(artefact: Artefact) -> list[str]:
    """The title and the table: per ratio, the median over rounds before and after, and the relative change."""
    rows = []
    for name, runs in artefact["results"]["runs"].items():
        for key in runs["before"][0]:
            before = statistics.median(r[key] for r in runs["before"])
            after = statistics.median(r[key] for r in runs["after"])
            change = after / before - 1
            rows.append([f"{name} {key}", before, after, f"{100 * change:+.1f} %", abs(change) <= TOLERANCE])
    refs = artefact["results"]["revisions"]
    title = f"Paired ratios before ({refs['before'][:7]}) and after ({refs['after'][:7]})"
    return [title, table(["ratio", "before", "after", "change", "within 5 %"], rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="source tree of the old code")
    parser.add_argument("--after", default=".", help="source tree of the new code")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", nargs="*", choices=list(SCRIPTS), default=list(SCRIPTS))
    parser.add_argument("--artefact", default="redesign_paired")
    args = parser.parse_args()
    load_at_start = load()
    runs: dict[str, dict[str, list[dict[str, float]]]] = {n: {"before": [], "after": []} for n in args.only}
    for round_ in range(args.rounds):
        order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
        for name in args.only:
            for side in order:
                runs[name][side].append(run(getattr(args, side), name))
                print(f"round {round_ + 1} {name} {side}: {runs[name][side][-1]}", flush=True)
    results = {
        "runs": runs,
        "revisions": {"before": revision(args.before), "after": revision(args.after)},
        "arguments": SCRIPTS,
    }
    save(args, results, load_at_start)
    artefact = read(args.artefact)
    title, rows = render(artefact)
    print(header(title, artefact) + "\n" + rows)


if __name__ == "__main__":
    main()
