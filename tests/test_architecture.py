"""The shape the redesign promised, checked on every run: a pure core, and no class or function too big
to read in one go."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

RELAY = Path(__file__).resolve().parent.parent / "relay"
IMPURE = {"asyncio", "socket", "os", "time", "random", "threading", "subprocess", "selectors", "ssl"}


def modules(under: Path) -> list[Path]:
    return sorted(under.rglob("*.py"))


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", modules(RELAY / "core"), ids=lambda p: p.name)
def test_the_core_does_no_io(path: Path) -> None:
    assert not imported(path) & IMPURE


def test_the_core_is_a_package_of_at_least_six_modules() -> None:
    assert (RELAY / "core" / "__init__.py").exists()
    assert len([p for p in modules(RELAY / "core") if p.name != "__init__.py"]) >= 6


def test_every_package_has_an_init() -> None:
    for directory in [RELAY, *(p for p in RELAY.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        assert (directory / "__init__.py").exists(), directory


@pytest.mark.parametrize("path", modules(RELAY), ids=lambda p: str(p.relative_to(RELAY)))
def test_no_class_over_250_lines_and_no_function_over_60(path: Path) -> None:
    too_big = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 250:
            too_big.append(f"class {node.name}: {node.end_lineno - node.lineno + 1} lines")
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60:
            too_big.append(f"def {node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert too_big == []
