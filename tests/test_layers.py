"""Imports point down: the library (``mgllava/``, ``detector/``, ``warehouse/``) never imports the
orchestration layer (``flows``, Prefect), and the product never imports the demo kit
(``mgllava.shapes``). An AST check of every module, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ("mgllava", "detector", "warehouse")
TOP_FLOOR = "mgllava/cli.py"  # `mgllava run` and `mgllava detect --dask-address` start flows
ORCHESTRATION = ("flows", "prefect", "prefect_dask")
DEMO_KIT = "mgllava.shapes"
# product modules that still import the demo kit, being moved out (issue 19: mgllava/pipeline.py becomes
# mgllava/lineage.py and flows/keys.py; the kit's preparation is the flows' business)
def imported_modules(source: str, module: str) -> set[str]:
    """Every module ``source`` (the module named ``module``) imports, anywhere in it: ``import a.b``,
    ``from a import b`` (as ``a`` and ``a.b``), relative imports resolved, and
    ``importlib.import_module("...")`` with a literal name."""
    names: set[str] = set()
    package = module.split(".")[:-1]  # a module's package; an __init__'s is its own
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value))
    return names


def _within(name: str, roots) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def library_modules() -> list[Path]:
    return sorted(p for package in LIBRARY for p in (ROOT / package).rglob("*.py"))


def _imports(path: Path) -> set[str]:
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return imported_modules(path.read_text(), module)


def test_the_checker_sees_imports_anywhere():
    source = ("import os\n"
              "def f():\n    from prefect import flow\n"
              "def g():\n    import importlib; importlib.import_module('flows.detect')\n"
              "from .world import generate\n")
    names = imported_modules(source, "mgllava.shapes.zoo")
    assert {n for n in names if _within(n, ORCHESTRATION)} == {"prefect", "prefect.flow", "flows.detect"}
    assert _within("mgllava.shapes.world.generate", (DEMO_KIT,)) and "mgllava.shapes.world.generate" in names
    assert not _within("prefectural", ORCHESTRATION)


def test_library_modules_never_import_flows_or_prefect():
    assert len(library_modules()) > 40  # the walk found the packages
    offenders = {
        str(path.relative_to(ROOT)): sorted(n for n in _imports(path) if _within(n, ORCHESTRATION))
        for path in library_modules() if str(path.relative_to(ROOT)) != TOP_FLOOR
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_only_the_top_floor_imports_flows():
    assert any(_within(n, ("flows",)) for n in _imports(ROOT / TOP_FLOOR))


def test_the_product_never_imports_the_demo_kit():
    offenders = {}
    for path in library_modules():
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("mgllava", "shapes") or str(rel) == TOP_FLOOR:
            continue  # the kit itself; the CLI registers the kit's commands
        names = sorted(n for n in _imports(path) if _within(n, (DEMO_KIT,)))
        if names:
            offenders[str(rel)] = names
    assert offenders == {}
