"""Packaging: the runtime dependencies in pyproject.toml are exactly what ``ttc_lightning`` imports, and the extras
cover what recipes/, benchmarks/ and tests/ import."""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]


def top_level_imports(folder: Path) -> dict[str, str]:
    """Each top-level module imported anywhere under ``folder`` (absolute imports, also inside functions), with a
    file that imports it."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements: list[str]) -> set[str]:
    """The distribution names of PEP 508 requirement strings (``"torch>=2.1"`` -> ``"torch"``)."""
    names = set()
    for requirement in requirements:
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
        assert match is not None, requirement
        names.add(normalise(match.group()))
    return names


def distributions(modules: dict[str, str], local: set[str]) -> dict[str, str]:
    """The installed distribution of each third-party module (``sklearn`` -> ``scikit-learn``), with its importer."""
    owners = packages_distributions()
    result = {}
    for module, where in modules.items():
        if module in sys.stdlib_module_names or module in local:
            continue
        assert module in owners, f"{where} imports {module!r}, which no installed distribution provides"
        for distribution in owners[module]:
            result[normalise(distribution)] = where
    return result


@pytest.fixture(scope="module")
def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_runtime_dependencies_are_what_the_package_imports(project):
    imported = distributions(top_level_imports(ROOT / "ttc_lightning"), {"ttc_lightning"})
    runtime = declared(project["dependencies"])
    undeclared = {name: where for name, where in imported.items() if name not in runtime}
    assert not undeclared, f"imported by ttc_lightning but not in [project] dependencies: {undeclared}"
    unused = runtime - set(imported)
    assert not unused, f"in [project] dependencies but never imported by ttc_lightning: {sorted(unused)} (an extra?)"


@pytest.mark.parametrize(
    ("folders", "extras"),
    [
        (("recipes", "benchmarks"), ("recipes", "cli")),
        (("tests",), ("dev", "recipes", "cli")),
    ],
)
def test_extras_cover_what_recipes_benchmarks_and_tests_import(folders, extras, project):
    """Recipes and benchmarks need the ``recipes`` extra (``cli`` for LightningCLI); tests need ``dev`` too. Their
    own modules (``digits``, ``common``, ...) import each other by name."""
    local = {"ttc_lightning"} | {
        path.stem for folder in ("recipes", "benchmarks", "tests") for path in (ROOT / folder).rglob("*.py")
    }
    imported: dict[str, str] = {}
    for folder in folders:
        imported |= distributions(top_level_imports(ROOT / folder), local)
    allowed = declared(project["dependencies"])
    for extra in extras:
        allowed |= declared(project["optional-dependencies"][extra])
    undeclared = {name: where for name, where in imported.items() if name not in allowed}
    assert not undeclared, f"imported by {'/, '.join(folders)}/ but in none of {extras} nor the runtime: {undeclared}"


def test_the_hydra_extra_is_hydra_core(project):
    assert declared(project["optional-dependencies"]["hydra"]) == {"hydra-core"}
    assert {"hydra-core", "torchmetrics", "numpy"}.isdisjoint(declared(project["dependencies"]))


def test_top_level_imports_finds_imports_inside_functions(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(
        "import os.path\nfrom . import b\n\ndef f():\n    from numpy import linalg\n"
    )
    assert top_level_imports(tmp_path / "pkg") == {"os": "pkg/a.py", "numpy": "pkg/a.py"}
