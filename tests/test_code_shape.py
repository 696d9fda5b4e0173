"""The shape issue #8 asked for stays true: short functions in model/ and service/.

Layering and cycles are checked by import-linter in `make lint`; this checks what it cannot.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 60
# Declarative option lists (typer signatures) are long by nature, not by hidden logic.
DECLARATIVE = {("model/cli.py", "train")}


def long_functions(max_lines: int = MAX_LINES) -> list[str]:
    found = []
    for package in ("model", "service"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(), rel)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                    lines = (node.end_lineno or node.lineno) - first + 1
                    if lines > max_lines and (rel, node.name) not in DECLARATIVE:
                        found.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_sixty_lines() -> None:
    assert long_functions() == []


def test_the_check_sees_long_functions() -> None:
    assert long_functions(max_lines=10), "the scan found no function longer than 10 lines"
