"""The one-way flow of the packages: competition -> features -> level1_models -> level2_stacking ->
(prediction, reports). Every import, at module level or inside a function, is read from the source."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# The floor of each package; a package imports only packages on lower floors. `reports` and
# `prediction` share the top floor: `prediction` may use `reports`, never the other way.
FLOORS = {"competition": 0, "features": 1, "submissions": 1, "level1_models": 2, "level2_stacking": 3,
          "reports": 4, "prediction": 4}
ALLOWED_SIDEWAYS = {("prediction", "reports")}


def imported_packages(source: str) -> set[str]:
    """Top-level names of every absolute import in ``source``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def upward_imports(root: Path) -> list[str]:
    """``file -> package`` for each import of a package on the same or a higher floor."""
    bad = []
    for package, floor in FLOORS.items():
        for path in sorted((root / package).rglob("*.py")):
            for other in imported_packages(path.read_text()) & FLOORS.keys() - {package}:
                if FLOORS[other] >= floor and (package, other) not in ALLOWED_SIDEWAYS:
                    bad.append(f"{path.relative_to(root)} -> {other}")
    return bad


def test_no_package_imports_a_floor_above_it():
    assert upward_imports(REPO) == []


def test_an_upward_import_inside_a_function_is_found(tmp_path):
    for package in FLOORS:
        (tmp_path / package).mkdir()
    (tmp_path / "level2_stacking" / "pipeline.py").write_text(
        "from competition.paths import WorkPaths\n\ndef f():\n    from reports.plots import write_prediction_plots\n")
    (tmp_path / "reports" / "summary.py").write_text("import prediction.run\nimport level2_stacking\n")
    (tmp_path / "prediction" / "report.py").write_text("from reports import plots\n")
    assert upward_imports(tmp_path) == ["level2_stacking/pipeline.py -> reports", "reports/summary.py -> prediction"]
