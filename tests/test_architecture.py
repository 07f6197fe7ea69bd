"""The packages depend one way: instantstyle (library) ← data_tools (tools, shard format) ← train."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Bottom to top: a package may import itself and the packages listed before it, never one after it.
LAYERS = ("instantstyle", "data_tools", "train")


def imported_packages(path: Path) -> set[tuple[int, str]]:
    """(line, top-level package) of every import in a file, including imports inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, alias.name.split(".")[0]) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add((node.lineno, node.module.split(".")[0]))
    return found


def violations(repo: Path = REPO) -> list[str]:
    """Every import that points up the layer order, as 'file:line imports package'."""
    bad = []
    for level, package in enumerate(LAYERS):
        above = set(LAYERS[level + 1:])
        for path in sorted((repo / package).rglob("*.py")):
            bad += [f"{path.relative_to(repo)}:{line} imports {target}"
                    for line, target in sorted(imported_packages(path)) if target in above]
    return bad


def test_packages_import_only_downward():
    assert violations() == []


def test_the_rule_catches_an_upward_import(tmp_path):
    for package in LAYERS:
        (tmp_path / package).mkdir()
    (tmp_path / "instantstyle" / "bad.py").write_text("def f():\n    from train.task import build_base\n")
    (tmp_path / "data_tools" / "also_bad.py").write_text("import train.data\n")
    (tmp_path / "train" / "fine.py").write_text("from data_tools.shards import open_shard\nimport instantstyle\n")
    assert violations(tmp_path) == ["instantstyle/bad.py:2 imports train", "data_tools/also_bad.py:1 imports train"]
