"""The packages depend one way: instantstyle (library) ← data_tools (tools, shard format) ← train ← benchmarks.

``benchmarks/`` measures the product and sits on top: no product package ever imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Bottom to top: a package may import itself and the packages listed before it, never one after it.
LAYERS = ("instantstyle", "data_tools", "train", "benchmarks")


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
    (tmp_path / "train" / "measured.py").write_text("from benchmarks.bench_data import main\n")
    (tmp_path / "benchmarks" / "bench.py").write_text("import train.data\nfrom instantstyle import adapter\n")
    assert violations(tmp_path) == ["instantstyle/bad.py:2 imports train", "data_tools/also_bad.py:1 imports train",
                                    "train/measured.py:1 imports benchmarks"]


def test_product_modules_do_not_measure_the_product():
    """Benchmarks and research runners live in benchmarks/, not in the packages a user installs."""
    product = [p for package in LAYERS[:-1] for p in (REPO / package).rglob("*.py")]
    misplaced = [str(p.relative_to(REPO)) for p in product
                 if p.stem.startswith(("bench_", "measure_"))]
    assert misplaced == []
