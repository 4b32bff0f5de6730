"""The structural goals of the core redesign (issue 11), measured on ``ttc_lightning/`` with ``ast``.

``python tests/test_structure.py [ROOT]`` prints the measurements (module lengths, the longest function bodies, the
largest ``__init__`` signatures) of the package under ROOT (default: this checkout). The layering goals (entropy
written only in ``ops/entropy.py``, which layer imports which) are checked in ``tests/test_layering.py``.
"""

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_INIT_PARAMETERS = 14
MAX_ADAPTATION_PARAMETERS = 12
#: The one module that touches Lightning's private attributes.
LIGHTNING_INTERNALS = "lightning_internals.py"


def modules(root: Path = ROOT) -> dict[str, str]:
    """Source of every module of the package, by path relative to the package."""
    package = root / "ttc_lightning"
    return {str(p.relative_to(package)): p.read_text() for p in sorted(package.rglob("*.py"))}


def functions(source: str) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body, its docstring excluded."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:] or body
    return (fn.end_lineno or fn.lineno) - body[0].lineno + 1


def parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Named parameters, ``self`` and ``*args``/``**kwargs`` excluded."""
    a = fn.args
    return len([p for p in [*a.posonlyargs, *a.args, *a.kwonlyargs] if p.arg not in ("self", "cls")])


def longest_functions(root: Path = ROOT, n: int = 8) -> list[tuple[int, str]]:
    found = [(body_lines(f), f"{path}:{f.name}") for path, src in modules(root).items() for f in functions(src)]
    return sorted(found, reverse=True)[:n]


def largest_inits(root: Path = ROOT, n: int = 8) -> list[tuple[int, str]]:
    found = []
    for path, src in modules(root).items():
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ClassDef):
                for f in node.body:
                    if isinstance(f, ast.FunctionDef) and f.name == "__init__":
                        found.append((parameters(f), f"{path}:{node.name}"))
    return sorted(found, reverse=True)[:n]


def test_no_module_is_over_400_lines() -> None:
    long = {path: src.count("\n") for path, src in modules().items() if src.count("\n") > MAX_MODULE_LINES}
    assert not long


def test_no_function_body_is_over_60_lines() -> None:
    assert [f for f in longest_functions(n=100) if f[0] > MAX_FUNCTION_LINES] == []


def test_no_init_takes_over_14_parameters_and_the_adaptation_base_at_most_12() -> None:
    assert [f for f in largest_inits(n=100) if f[0] > MAX_INIT_PARAMETERS] == []
    import ttc_lightning as ttc

    base = ttc.TestTimeTraining.__init__.__code__
    assert base.co_argcount + base.co_kwonlyargcount - 1 <= MAX_ADAPTATION_PARAMETERS


def test_lightning_private_attributes_are_touched_in_one_module() -> None:
    private = re.compile(
        r"\b(_IndexBatchSamplerWrapper|_trainer|\w*loop\.inference_mode|_results|_logger_connector|\w*_progress_bar)\b"
    )
    found = [path for path, src in modules().items() if path != LIGHTNING_INTERNALS and private.search(src)]
    assert not found


def test_no_strategy_reads_the_model_s_own_forward_from_a_shared_context() -> None:
    found = [path for path, src in modules().items() if re.search(r"context\.base\b", src)]
    assert not found


if __name__ == "__main__":
    root = Path(sys.argv[1]).resolve() if sys.argv[1:] else ROOT
    lines = sorted(((src.count("\n"), path) for path, src in modules(root).items()), reverse=True)
    print("modules over 300 lines:", [f"{p} {n}" for n, p in lines if n > 300])
    print("total lines:", sum(n for n, _ in lines), "in", len(lines), "modules")
    print("longest function bodies:", [f"{p} {n}" for n, p in longest_functions(root)])
    print("largest __init__:", [f"{p} {n}" for n, p in largest_inits(root)])
