"""README.md's main table, rendered from the committed artefacts of the main job, so that the two cannot drift apart.

    .venv/bin/python benchmarks/render_main_table.py           # check: exit 1 when README.md's block differs
    .venv/bin/python benchmarks/render_main_table.py --write   # rewrite the block in README.md

The block between :data:`BEGIN` and :data:`END` holds the caption, table and notes of
``benchmarks/results/digits_results.json`` (``recipes/benchmark.py``'s :func:`readme_block`), the choice of
``benchmarks/results/hparams.json`` (``benchmarks/select_hparams.py``) and the batch-1 MEMO figure of
``benchmarks/results/memo_bs1.json`` (``benchmarks/memo_bs1.py``). ``tests/test_recipes.py`` runs the check.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import memo_bs1  # noqa: E402  (the folders put on the path above)
import select_hparams  # noqa: E402
from benchmark import RESULTS, readme_block  # noqa: E402

README = ROOT / "README.md"
BEGIN = "<!-- main table: rendered from benchmarks/results/ by benchmarks/render_main_table.py; do not edit -->"
END = "<!-- end of main table -->"


def expected() -> str:
    """The block as the committed artefacts render it, markers included."""
    parts = [
        readme_block(json.loads((RESULTS / "digits_results.json").read_text())),
        select_hparams.render(json.loads((RESULTS / "hparams.json").read_text())),
        memo_bs1.render(json.loads((RESULTS / "memo_bs1.json").read_text())),
    ]
    return "\n\n".join([BEGIN, *parts, END])


def current(text: str) -> str:
    """The block in ``text``, markers included; ``ValueError`` unless it holds exactly one."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"README.md must hold {BEGIN!r} once, then {END!r} once.")
    return text[text.index(BEGIN) : text.index(END) + len(END)]


def main() -> None:
    text = README.read_text()
    block, rendered = current(text), expected()
    if "--write" in sys.argv[1:]:
        README.write_text(text.replace(block, rendered))
        print("README.md's main table rewritten from benchmarks/results/.")
    elif block != rendered:
        print("README.md's main table differs from benchmarks/results/; run with --write. Rendered:\n")
        print(rendered)
        raise SystemExit(1)
    else:
        print("README.md's main table equals its rendering from benchmarks/results/.")


if __name__ == "__main__":
    main()
