"""Sizes of the code's classes and functions: the largest first (a check on hub classes).

    python scripts/code_sizes.py [--classes N] [--functions N] [paths...]

Counts source lines (blank lines and docstrings included) and methods per class, and
lines per function or method; defaults to the services, the shared package and the CLI.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def sizes(paths: list[Path]) -> tuple[list[tuple[int, int, str]], list[tuple[int, str]]]:
    classes: list[tuple[int, int, str]] = []
    functions: list[tuple[int, str]] = []
    for root in paths:
        files = [root] if root.is_file() else sorted(root.rglob("*.py"))
        for f in files:
            tree = ast.parse(f.read_text(), str(f))
            for node in ast.walk(tree):
                end = getattr(node, "end_lineno", None) or 0
                if isinstance(node, ast.ClassDef):
                    methods = sum(
                        isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) for n in node.body
                    )
                    classes.append((end - node.lineno + 1, methods, f"{f}:{node.name}"))
                elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    functions.append((end - node.lineno + 1, f"{f}:{node.lineno}:{node.name}"))
    return sorted(classes, reverse=True), sorted(functions, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--functions", type=int, default=15)
    args = parser.parse_args()
    paths = args.paths or [Path("services"), Path("shared"), Path("cli")]
    classes, functions = sizes(paths)
    print("lines methods class")
    for lines, methods, where in classes[: args.classes]:
        print(f"{lines:5d} {methods:7d} {where}")
    print("lines function")
    for lines, where in functions[: args.functions]:
        print(f"{lines:5d} {where}")


if __name__ == "__main__":
    main()
