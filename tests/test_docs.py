"""The README and docs/ say what the software does: every command, import, path and link in them works.

These tests read the documents' code blocks and references, never their prose: a module that is named
must exist, a flag must be one its ``--help`` lists, a Hydra override must compose, an import must
resolve, a linked file or heading must exist. A page that drifts from the code fails here, naming it.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import re
import runpy
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", REPO / "benchmarks" / "README.md", *(REPO / "docs").glob("*.md")])
PACKAGES = ("instantstyle", "data_tools", "train", "benchmarks")
FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.S | re.M)  # also fences indented in list items


def code_blocks(doc: Path, language: str) -> list[str]:
    """The fenced code blocks of one language in a Markdown file."""
    return [body for lang, body in FENCE.findall(doc.read_text()) if lang == language]


def shell_commands(doc: Path) -> list[list[str]]:
    """Every command line of the bash blocks and inline `python -m ...` spans, comments dropped, as shell words."""
    commands = []
    inline = re.findall(r"`(python -m [^`]+)`", re.sub(FENCE, "", doc.read_text()))
    for block in [*code_blocks(doc, "bash"), *inline]:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append([optional_marks_removed(w) for w in words if w not in ("[", "]")])
    return commands


def optional_marks_removed(word: str) -> str:
    """``[--seeds`` → ``--seeds`` and ``30]`` → ``30``: brackets that mark optional arguments, not list values."""
    if word.startswith("[-"):
        word = word[1:]
    return word[:-1] if word.endswith("]") and "[" not in word else word


def module_calls(words: list[str]) -> list[tuple[str, list[str]]]:
    """``python -m MODULE ARGS`` found in one command line."""
    return [(words[i + 2], words[i + 3:]) for i in range(len(words) - 2)
            if words[i] in ("python", "python3") and words[i + 1] == "-m"]


def overrides_of(args: list[str]) -> list[str]:
    """The Hydra overrides of a ``python -m train`` or ``./launch.sh`` call; a sweep keeps its first value."""
    sweep = "-m" in args or "--multirun" in args
    out, skip_next = [], False
    for word in args:
        if skip_next or word == "...":
            skip_next = False
            continue
        if word.startswith(("-", "[")) or "=" not in word:  # flags, and placeholders such as [KEY=VALUE]
            skip_next = word in ("--cfg", "--package", "-c")
            continue
        key, _, value = word.partition("=")
        if sweep and "," in value and not value.startswith(("[", "{", "'", '"')):
            value = value.split(",")[0]
        out.append(f"{key}={value}")
    return out


def documented(kind: str) -> list[tuple[str, object]]:
    """(document name, item) pairs over all documents: module calls, train overrides or launch overrides."""
    items = []
    for doc in DOCS:
        for words in shell_commands(doc):
            if kind == "launch" and "./launch.sh" in words:
                items.append((doc.name, overrides_of(words[words.index("./launch.sh") + 1:])))
            for module, args in module_calls(words):
                if kind == "module" and module != "train":
                    items.append((doc.name, (module, args)))
                elif kind == "train" and module == "train":
                    items.append((doc.name, overrides_of(args)))
    return items


@lru_cache(maxsize=None)
def help_flags(module: str) -> frozenset[str]:
    """The flags ``python -m MODULE --help`` prints (run in this process: the heavy imports are shared)."""
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            with pytest.raises(SystemExit):
                runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    return frozenset(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", out.getvalue()))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # runpy: the module was imported before (harmless here)
def test_every_documented_module_exists_and_knows_the_flags_it_is_shown_with():
    calls = documented("module")
    assert len(calls) >= 20, "the docs show the data, export, generate, evaluate and benchmark commands"
    for doc, (module, args) in calls:
        assert importlib.util.find_spec(module) is not None, f"{doc}: python -m {module}: no such module"
        flags = {a.split("=")[0] for a in args if a.startswith("--")}
        unknown = flags - help_flags(module)
        assert not unknown, f"{doc}: python -m {module} {' '.join(args)}: --help does not know {sorted(unknown)}"


def test_every_documented_training_command_composes():
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from train.preflight import quote_shards  # what python -m train (and launch.sh through it) does to argv first
    from train.config import CONFIG_DIR, ConfigError, check_known_keys, one_line

    commands = {tuple(o): doc for doc, o in documented("train") + documented("launch")}  # each distinct one once
    assert len(commands) >= 15, "the docs show python -m train and ./launch.sh commands"
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):  # once: composing is then fast
        for overrides, doc in commands.items():
            try:
                check_known_keys(compose(config_name="train", overrides=quote_shards(list(overrides))))
            except (HydraException, OmegaConfBaseException, ConfigError) as err:
                pytest.fail(f"{doc}: {' '.join(overrides)}: {one_line(err)}")


def test_every_import_in_a_python_example_resolves():
    names = 0
    for doc in DOCS:
        for block in code_blocks(doc, "python"):
            for node in ast.walk(ast.parse(block)):
                if isinstance(node, ast.ImportFrom):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        names += 1
                        assert hasattr(module, alias.name), f"{doc.name}: from {node.module} import {alias.name}"
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        importlib.import_module(alias.name)
    assert names >= 5


def resolves(dotted: str) -> bool:
    """``pkg.module.attr`` names an importable module, or an attribute of the longest importable prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_every_named_file_and_python_name_exists():
    # a file (with a suffix) or a folder (ending in /); `train/loss` is a metric name, not a path
    path_ref = re.compile(r"`((?:%s|configs|tests|docs)/(?:[\w./-]*\.\w+|[\w./-]*/))`" % "|".join(PACKAGES))
    name_ref = re.compile(r"`((?:%s)(?:\.\w+)+)" % "|".join(PACKAGES))
    for doc in DOCS:
        text = doc.read_text()
        for path in path_ref.findall(text):
            assert (REPO / path).exists(), f"{doc.name}: `{path}` does not exist"
        for dotted in name_ref.findall(text):
            assert resolves(dotted), f"{doc.name}: `{dotted}` is neither a module nor a name in one"


def test_every_named_test_exists():
    named = 0
    for doc in DOCS:
        for file, name in re.findall(r"`?(test_\w+\.py)(?:::(test_\w+))?", doc.read_text()):
            named += 1
            path = REPO / "tests" / file
            assert path.is_file(), f"{doc.name}: {file} does not exist"
            assert not name or re.search(rf"^def {name}\(", path.read_text(), re.M), f"{doc.name}: {file}::{name}"
    assert named >= 10


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_local_link_and_anchor_exists():
    links = 0
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            links += 1
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            assert path.exists(), f"{doc.name}: link to {target}: no such file"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", re.sub(FENCE, "", path.read_text()), re.M)
                assert anchor in {slug(h) for h in headings}, f"{doc.name}: link to {target}: no such heading"
    assert links >= 20


def test_readme_leads():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move details to a docs/ page"
