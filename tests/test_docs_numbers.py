"""The measured numbers in README.md and benchmarks/README.md are what the committed artefacts under
``benchmarks/results/`` say: each benchmark's ``render`` turns its artefact into the tables it prints, and those
tables, with the run's date, machine and load line, must appear in the docs verbatim."""

import importlib.util
import json
import os
import sys
from collections.abc import Callable
from types import ModuleType

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
RESULTS = os.path.join(BENCHMARKS, "results")
README = os.path.join(ROOT, "README.md")
BENCHMARKS_README = os.path.join(BENCHMARKS, "README.md")

#: artefact name -> the benchmark script that writes it
ARTEFACTS = {
    "tta_speed": "tta_speed",
    "tta_memory": "tta_memory",
    "tta_chunking": "tta_chunking",
    "tta_chunking_1thread": "tta_chunking",
    "ttt_speed": "ttt_speed",
    "ttt_stream": "ttt_stream",
    "iterative_digits": "iterative",
    "redesign_paired_speed": "paired",
    "redesign_paired_memory": "paired",
}


def module(name: str) -> ModuleType:
    """The benchmark script ``benchmarks/<name>.py``, imported (its ``main`` is not run)."""
    sys.path.insert(0, BENCHMARKS)
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def artefact(name: str) -> dict:
    with open(os.path.join(RESULTS, f"{name}.json")) as f:
        return json.load(f)


def text(path: str) -> str:
    with open(path) as f:
        return f.read()


def missing(blocks: list[str], doc: str) -> list[str]:
    """The blocks (tables, lines) not found verbatim in ``doc``."""
    return [block for block in blocks if block.strip() and block.strip() not in doc]


@pytest.mark.parametrize("name", sorted(ARTEFACTS))
def test_artefact_names_its_run(name):
    a = artefact(name)
    assert a["command"].startswith(".venv/bin/python benchmarks/")
    assert {"cpu", "cores", "torch_threads"} <= a["machine"].keys() and a["machine"]["cores"] >= 1
    assert {"python", "torch", "lightning", "ttc_lightning"} <= a["versions"].keys()
    assert len(a["date"]) >= 10 and len(a["load_average"]["start"]) == 3 and len(a["load_average"]["end"]) == 3
    assert isinstance(a["arguments"], dict) and a["results"]


@pytest.mark.parametrize("name", sorted(ARTEFACTS))
def test_benchmarks_readme_holds_the_rendered_artefact(name):
    script = module(ARTEFACTS[name])
    common = module("common")
    a = artefact(name)
    blocks = [common.machine(a), *script.render(a)]
    assert not missing(blocks, text(BENCHMARKS_README)), f"benchmarks/README.md differs from {name}.json"


def test_readme_holds_the_iterative_summary():
    table: Callable[[dict], str] = module("iterative").summary_table
    assert not missing([table(artefact("iterative_digits"))], text(README))


def test_benchmarks_readme_holds_the_tta_demo():
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    spec = importlib.util.spec_from_file_location("tta_demo", os.path.join(ROOT, "recipes", "tta_demo.py"))
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    a = artefact("tta_demo")
    assert a["command"] == ".venv/bin/python recipes/tta_demo.py"
    assert not missing([module("common").machine(a), demo.render(a["results"])], text(BENCHMARKS_README))


def test_readme_holds_the_fashion_mnist_benchmark_means():
    """The reduced Fashion-MNIST run of ``recipes/benchmark.py`` (published as ``fashion_mnist_results.json``)."""
    report = artefact("fashion_mnist_results")
    assert report["settings"]["data"]["name"] == "fashion_mnist"
    assert not missing([module("common").benchmark_means(report)], text(README))


def test_render_sees_a_changed_number():
    """The check can fail: a changed measurement renders a table that is no longer in the docs."""
    a = artefact("ttt_speed")
    a["results"]["blurred_digits"][0]["error"] += 1.0
    assert missing(module("ttt_speed").render(a), text(BENCHMARKS_README))
