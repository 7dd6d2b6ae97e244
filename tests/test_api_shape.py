"""The query API stays readable (issue 15): no function in ``api/`` is longer than 60 lines;
routers are one module per resource with small handlers, not one factory holding them all."""

from __future__ import annotations

import ast
from pathlib import Path

API = Path(__file__).resolve().parent.parent / "api"
MAX_LINES = 60


def long_functions(root: Path = API, limit: int = MAX_LINES) -> list[str]:
    """``path:line name (n lines)`` for each function (nested ones too) over ``limit``."""
    found = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                # Decorators count: a route's path and options are part of reading it.
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                length = (node.end_lineno or node.lineno) - first + 1
                if length > limit:
                    found.append(f"{path.name}:{first} {node.name} ({length} lines)")
    return found


def test_no_function_in_the_api_is_longer_than_60_lines() -> None:
    assert list(API.glob("*.py")), f"no modules found in {API}"
    assert long_functions() == []


def test_the_check_finds_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "long.py").write_text(f"def router():\n{body}\n\n\ndef short():\n    pass\n")
    assert long_functions(tmp_path) == [f"long.py:1 router ({MAX_LINES + 1} lines)"]
