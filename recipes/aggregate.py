"""One table from the jobs of a benchmark sweep.

    python recipes/benchmark.py -m ttc/ttt=none,bn,tent,eata
    python recipes/aggregate.py multirun/<date>/<time>

Reads every ``results.json`` under the sweep directory (one per job, ``{method: {...}}``), prints them as one
markdown table and writes the merged ``results.json`` into the sweep directory. Jobs that give the same method name
(a sweep over something other than the ttc groups) are told apart by their job number: ``tent#1``.
"""

import json
import sys
from pathlib import Path

from benchmark import markdown


def aggregate(sweep: Path) -> dict[str, dict[str, float]]:
    """The merged results of the jobs under ``sweep``, in job order."""
    files = sorted((p for p in sweep.glob("*/results.json")), key=lambda p: (len(p.parent.name), p.parent.name))
    if not files:
        raise FileNotFoundError(f"No <job>/results.json under {sweep}: is it a benchmark sweep's directory?")
    merged: dict[str, dict[str, float]] = {}
    for path in files:
        for method, row in json.loads(path.read_text()).items():
            merged[method if method not in merged else f"{method}#{path.parent.name}"] = row
    return merged


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python recipes/aggregate.py SWEEP_DIR")
    sweep = Path(sys.argv[1])
    merged = aggregate(sweep)
    (sweep / "results.json").write_text(json.dumps(merged, indent=2))
    print(markdown(merged))
    print(f"\nWritten to {sweep / 'results.json'}")


if __name__ == "__main__":
    main()
