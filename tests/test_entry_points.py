"""experiments/ holds entry points only, and no entry point imports another (each would drag in the
other's Hydra app): the library code they share lives in experiments.harness and experiments.reporting."""

from __future__ import annotations

import ast
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
ENTRY_POINTS = {"main", "finetune", "predict", "report", "bench", "export", "study", "finetune_compare", "selection"}


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, as dotted names (``from experiments import x`` gives experiments.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom):  # relative import from an entry script
            found.update(f"experiments.{alias.name}" for alias in node.names)
    return found


def test_experiments_holds_only_entry_points() -> None:
    modules = {path.stem for path in EXPERIMENTS.glob("*.py")} - {"__init__"}
    assert modules == ENTRY_POINTS


def test_no_entry_point_imports_another() -> None:
    entry_modules = {f"experiments.{name}" for name in ENTRY_POINTS}
    for name in sorted(ENTRY_POINTS):
        imported = _imported_modules(EXPERIMENTS / f"{name}.py") & entry_modules
        assert not imported, f"experiments/{name}.py imports {sorted(imported)}"


def test_the_check_sees_an_import(tmp_path) -> None:
    """The AST walk finds both spellings (a guard against a check that can never fail)."""
    source = tmp_path / "probe.py"
    source.write_text("from experiments.main import run\nfrom experiments import predict\n")
    assert {"experiments.main", "experiments.predict"} <= _imported_modules(source)
