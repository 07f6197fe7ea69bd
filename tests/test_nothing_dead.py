"""Nothing ships that does nothing: every config key acts, YAML only overrides, no function lives for tests only."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from collections import Counter
from dataclasses import fields
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from train.config import CONFIG_DIR, GROUPS, TrainConfig, compose

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("instantstyle", "data_tools", "train")


def product_files() -> list[Path]:
    return sorted(p for package in PRODUCT for p in (REPO / package).rglob("*.py"))


class Reads(ast.NodeVisitor):
    """Attribute names read in the product, and the first argument of every ``instantiate(...)`` call.

    A schema's own range checks (``__post_init__``) do not count: a key read only there acts on nothing.
    """

    def __init__(self) -> None:
        self.attributes: set[str] = set()
        self.instantiated: set[str] = set()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if node.name != "__post_init__":
            self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.ctx, ast.Load):
            self.attributes.add(node.attr)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id == "instantiate" and node.args:
            first = node.args[0]
            self.instantiated.add(first.attr if isinstance(first, ast.Attribute) else getattr(first, "id", ""))
        self.generic_visit(node)


@pytest.fixture(scope="module")
def reads() -> Reads:
    visitor = Reads()
    for path in product_files():
        visitor.visit(ast.parse(path.read_text()))
    return visitor


def group_targets(group: str) -> list[str]:
    """Every ``_target_`` the group can have: the schema's default and each option file's override."""
    targets = {next(f.default for f in fields(GROUPS[group]) if f.name == "_target_")}
    for path in (CONFIG_DIR / group).glob("*.yaml"):
        node = yaml.safe_load(path.read_text()) or {}
        node = node.get(group, node) if "# @package _global_" in path.read_text() else node
        targets.update([node["_target_"]] if "_target_" in node else [])
    return sorted(targets)


def target_parameters(target: str) -> set[str] | None:
    """Named parameters of the callable ``target`` (None when its package is not installed)."""
    module, _, name = target.rpartition(".")
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None
    return set(inspect.signature(getattr(importlib.import_module(module), name)).parameters)


def test_every_schema_key_is_read_by_the_product(reads):
    dead = []
    for group, schema in GROUPS.items():
        keys = [f.name for f in fields(schema)]
        if "_target_" not in keys:  # read as typed attributes
            dead += [f"{group}.{k}" for k in keys if k not in reads.attributes]
            continue
        # Built by Hydra's instantiate: the wiring keys act there, every other key is a builder argument.
        if group not in reads.instantiated:
            dead += [f"{group}.{k}" for k in keys]
        for target in group_targets(group):
            parameters = target_parameters(target)
            if parameters is not None:
                dead += [f"{group}.{k} ({target})" for k in keys if not k.startswith("_") and k not in parameters]
    top = [f.name for f in fields(TrainConfig) if f.name not in GROUPS]
    dead += [k for k in top if k not in reads.attributes]
    assert dead == []


def test_a_key_read_only_by_its_own_range_check_counts_as_dead():
    visitor = Reads()
    visitor.visit(ast.parse("class C:\n    def __post_init__(self):\n        assert self.only_checked\n"
                            "def use(c):\n    return c.used\n"))
    assert "used" in visitor.attributes and "only_checked" not in visitor.attributes


def nested(node: dict, prefix: str = "") -> dict[str, object]:
    """{"a.b": value} for every leaf of a YAML mapping (lists are leaves)."""
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            flat.update(nested(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def schema_defaults() -> dict[str, object]:
    """Every key's schema default, by dotted name (``???`` for a required one)."""
    return nested(OmegaConf.to_container(OmegaConf.structured(TrainConfig), resolve=False))


def before(path: Path, body: dict) -> dict[str, object]:
    """What the keys of ``path`` would be without its own body: the schema, plus what its defaults list merges."""
    group = path.parent.name
    if group != "experiment":
        values = schema_defaults()
        for entry in body.get("defaults", []):
            if entry != "_self_":  # a sibling option this one extends
                sibling = yaml.safe_load((path.parent / f"{entry}.yaml").read_text()) or {}
                values.update(nested({group: {k: v for k, v in sibling.items() if k != "defaults"}}))
        return values
    overrides = []
    for entry in body.get("defaults", []):
        if isinstance(entry, dict):  # "override /model: flux"
            ((key, choice),) = entry.items()
            overrides.append(f"{key.removeprefix('override ').strip('/')}={choice}")
        elif entry.startswith("/experiment/"):
            overrides.append(f"experiment={entry.removeprefix('/experiment/')}")
    cfg = compose(overrides)
    return nested(OmegaConf.to_container(cfg, resolve=False))


def yaml_files() -> list[Path]:
    return sorted(p for p in CONFIG_DIR.glob("*/*.yaml") if p.parent.name != "accelerate")


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_yaml_files_only_choose_and_override(path):
    text = path.read_text()
    body = yaml.safe_load(text) or {}
    own = {k: v for k, v in body.items() if k not in ("defaults", "hydra")}
    keys = nested(own if "# @package _global_" in text else {path.parent.name: own})
    earlier = before(path, body)
    repeats = [f"{key}: {value}" for key, value in keys.items() if key in earlier and earlier[key] == value]
    assert repeats == [], f"{path.name} repeats what the schema (or what it extends) already says"


def test_the_repeat_check_sees_a_repeated_default(tmp_path):
    (tmp_path / "optim").mkdir()
    path = tmp_path / "optim" / "adamw.yaml"
    path.write_text("_target_: torch.optim.AdamW\nlr: 3.0e-4\n")
    earlier = before(path, yaml.safe_load(path.read_text()))
    assert earlier["optim._target_"] == "torch.optim.AdamW" and earlier["optim.lr"] != 3.0e-4


# Names whose callers are frameworks, not our code.
CALLED_BY_FRAMEWORKS = {"forward", "state_dict", "load_state_dict", "setup", "main"}


def defined_names(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [(node.name, node.lineno) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and not node.name.startswith("__") and node.name not in CALLED_BY_FRAMEWORKS]


def references(tree: ast.AST) -> Counter:
    """Names used in code: loaded names and attributes, imports, and strings that are a (dotted) name."""
    found: Counter = Counter()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            found[node.id] += 1
        elif isinstance(node, ast.Attribute):
            found[node.attr] += 1
        elif isinstance(node, ast.alias):
            found[node.name.rpartition(".")[2]] += 1
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"[\w.]+", node.value):
            found[node.value.rpartition(".")[2]] += 1  # getattr(module, "name"), "package.module.function"
    return found


def test_no_product_function_is_called_only_by_tests():
    # Callers: the product, the benchmarks that measure it, the configs' _target_s, launch.sh and the entry points;
    # a mention in a docstring or comment is no call.
    used: Counter = Counter()
    for path in [*product_files(), *(REPO / "benchmarks").rglob("*.py")]:
        used += references(ast.parse(path.read_text()))
    text = "\n".join(p.read_text() for p in [*CONFIG_DIR.rglob("*.yaml"), REPO / "launch.sh", REPO / "pyproject.toml"])
    unused = [f"{path.relative_to(REPO)}:{line} {name}" for path in product_files() for name, line in defined_names(path)
              if not used[name] and not re.search(rf"\b{re.escape(name)}\b", text)]
    assert unused == []


def test_a_function_named_only_in_a_docstring_counts_as_unused():
    used = references(ast.parse('def f():\n    """Calls ``g``."""\n    return getattr(m, "h")(k.j)\n'))
    assert not used["g"] and used["h"] and used["j"]
