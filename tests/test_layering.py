"""The package's layering, read from its source: who may import whom, and where entropy is written.

The neutral layer ``ttc_lightning.ops`` (shared tensor operations) imports no other part of the package but
``checks``. Stopping rules and halting build on ``ops``, augmentation (``tta``) on them; augmentation, adaptation
(``ttt``) and iterative inference import none of each other's modules (but for MEMO's deterministic TTA views).
The entropy formula ``p * log p`` appears only in ``ttc_lightning/ops/entropy.py``.
"""

import ast
from pathlib import Path

import ttc_lightning

PACKAGE = Path(ttc_lightning.__file__).parent
ENTROPY_MODULE = PACKAGE / "ops" / "entropy.py"
#: Calls and names that stand for a logarithm of tensors (``math.log`` of a scalar, e.g. ``ln C``, is not one).
LOG_CALLS = {"log", "log_softmax", "logsigmoid", "log1p", "log2", "log10", "xlogy"}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imports(tree: ast.Module) -> set[str]:
    """The ``ttc_lightning`` modules a module imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module, "the package imports absolutely (the scan reads no relative import)"
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] == "ttc_lightning"}


def test_the_import_scan_reads_both_import_forms():
    tree = ast.parse("import ttc_lightning.tta.merge\nfrom ttc_lightning.ops import entropy\nimport torch\n")
    assert imports(tree) == {"ttc_lightning.tta.merge", "ttc_lightning.ops", "ttc_lightning.ops.entropy"}


def in_layer(module: str, layer: str) -> bool:
    return module == layer or module.startswith(layer + ".")


#: What each part of the package must not import: strategies build on the core and ``ops``, never on each other.
FORBIDDEN = {
    "ttc_lightning.stopping": ("ttc_lightning.tta", "ttc_lightning.ttt", "ttc_lightning.iterative"),
    "ttc_lightning.halting": ("ttc_lightning.tta", "ttc_lightning.ttt", "ttc_lightning.iterative"),
    "ttc_lightning.tta": ("ttc_lightning.ttt", "ttc_lightning.iterative"),
    "ttc_lightning.ttt": ("ttc_lightning.tta", "ttc_lightning.iterative", "ttc_lightning.halting"),
    "ttc_lightning.iterative": ("ttc_lightning.tta", "ttc_lightning.ttt"),
}
#: Imports across those lines that are allowed: MEMO's deterministic views (``transforms=``) are TTA's views.
ALLOWED = {
    "ttc_lightning.ttt.memo": ("ttc_lightning.tta.augmenter", "ttc_lightning.tta.transforms"),
}


def test_strategies_and_halting_import_only_what_their_layer_allows():
    for name, tree in modules().items():
        for layer, forbidden in FORBIDDEN.items():
            if in_layer(name, layer):
                allowed = ALLOWED.get(name, ())
                bad = sorted(
                    m
                    for m in imports(tree)
                    if any(in_layer(m, f) for f in forbidden) and not any(in_layer(m, a) for a in allowed)
                )
                assert not bad, f"{name} imports {bad}"


def test_ops_imports_only_ops_and_checks():
    for name, tree in modules().items():
        if in_layer(name, "ttc_lightning.ops"):
            bad = {
                m
                for m in imports(tree)
                if not any(in_layer(m, ok) for ok in ("ttc_lightning.ops", "ttc_lightning.checks"))
            }
            assert not bad, f"{name} imports {sorted(bad)}"


def is_log(node: ast.expr) -> bool:
    """Whether ``node`` is a tensor logarithm: a call such as ``x.log()`` or ``torch.log_softmax(x)``, or a name
    such as ``log_p``."""
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute):
            scalar = isinstance(func.value, ast.Name) and func.value.id == "math"
            return func.attr in LOG_CALLS and not scalar
        return isinstance(func, ast.Name) and func.id in LOG_CALLS
    if isinstance(node, ast.Name | ast.Attribute):
        name = node.id if isinstance(node, ast.Name) else node.attr
        return name.startswith("log_") or name in {"log_p", "logp"}
    return False


def entropy_products(tree: ast.Module) -> list[int]:
    """Lines holding a product with a tensor logarithm (``p * log p``, ``q * log_softmax(s)``, ...)."""
    return sorted(
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult) and (is_log(node.left) or is_log(node.right))
    )


def test_the_scan_finds_entropy_written_out():
    source = "a = -(p * log_p).sum(1)\nb = (p * p.clamp(min=1e-9).log()).sum(1)\nc = -(q * s.log_softmax(1)).sum(1)\n"
    source += "d = torch.log_softmax(x, 1).exp() * torch.log_softmax(x, 1)\ne = margin * math.log(10)\n"
    assert entropy_products(ast.parse(source)) == [1, 2, 3, 4]


def test_entropy_is_written_only_in_the_entropy_module():
    assert entropy_products(ast.parse(ENTROPY_MODULE.read_text()))  # the scan sees the module's own formulas
    for path in sorted(PACKAGE.rglob("*.py")):
        if path != ENTROPY_MODULE:
            lines = entropy_products(ast.parse(path.read_text()))
            assert not lines, f"{path.relative_to(PACKAGE.parent)} writes p * log p on lines {lines}"
