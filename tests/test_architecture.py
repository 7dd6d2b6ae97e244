"""The tree is the architecture: across packages only public names are imported.

`lint-imports` (pyproject: [tool.importlinter]) checks which package may import which; this
checks *what* they import: never another package's private module (``mailmeta.x._y``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_dirs(root: Path) -> list[str]:
    return sorted(p.parent.name for p in root.glob("*/__init__.py") if p.parent.name != "tests")


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return found


def private_imports_across_packages(root: Path = ROOT) -> list[str]:
    problems = []
    for package in package_dirs(root):
        for path in (root / package).rglob("*.py"):
            for line, module in _imported_modules(path):
                parts = module.split(".")
                if len(parts) < 3 or parts[0] != "mailmeta" or parts[1] == package:
                    continue
                if any(p.startswith("_") for p in parts[2:]):
                    problems.append(f"{path.relative_to(root)}:{line} imports {module}")
    return problems


def test_packages_import_only_public_names_of_other_packages() -> None:
    assert {"api", "ingest", "sinks", "store", "streams"} <= set(package_dirs(ROOT))
    assert private_imports_across_packages() == []


def test_the_check_sees_a_private_import(tmp_path: Path) -> None:
    for name in ("api", "store"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "store" / "_rows.py").write_text("from mailmeta.store._base import X\n")
    (tmp_path / "api" / "_app.py").write_text("from mailmeta.store._rows import to_arrow\n")
    assert private_imports_across_packages(tmp_path) == [
        "api/_app.py:1 imports mailmeta.store._rows"
    ]
