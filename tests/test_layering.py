"""DESIGN.md §2: product code never imports the simulator (llmuxd/sim). What both need, such
as the GPU ledger's file format, lives in a neutral module (llmuxd/gpu_ledger.py)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmuxd"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside a function (a late import counts)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_no_product_module_imports_the_simulator():
    offenders = {
        str(path.relative_to(PACKAGE.parent)): sorted(n for n in imported_modules(path)
                                                      if n == "llmuxd.sim" or n.startswith("llmuxd.sim."))
        for path in PACKAGE.rglob("*.py") if "sim" not in path.relative_to(PACKAGE).parts[:1]
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_simulator_reads_the_ledger_format_from_the_neutral_module():
    assert "llmuxd.gpu_ledger" in imported_modules(PACKAGE / "sim" / "ledger.py")
    assert "llmuxd.gpu_ledger" in imported_modules(PACKAGE / "checkpoint" / "gpu_probe.py")
