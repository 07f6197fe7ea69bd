"""Write the config reference (docs/config.md) from the schemas in ``train/config.py`` and the YAML files.

    python -m train.config_reference --out docs/config.md      # regenerate
    python -m train.config_reference --check docs/config.md    # exit 1 when the file is stale

Every key of every group comes from its schema dataclass (type, default, and the comment beside the
field as its meaning); every choice of a group comes from ``configs/<group>/*.yaml`` with what it sets.
Nothing here is written by hand, so the reference cannot drift from the code. Reads only; imports no torch.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import re
import sys
import tokenize
from pathlib import Path
from typing import Any

import yaml

from train.config import CONFIG_DIR, GROUPS, TrainConfig

COMMAND = "python -m train.config_reference --out docs/config.md"
FOLDER_NOTES = {"accelerate": "The `ACCELERATE_CONFIG` files of `./launch.sh` (Accelerate's own format, "
                               "not a training group).",
                "hydra/launcher": "Where the points of a sweep run (`python -m train -m hydra/launcher=slurm …`, "
                                  "see [sweeps.md](sweeps.md)); besides these, hydra-submitit-launcher's own "
                                  "`submitit_local` and `submitit_slurm`."}


@dataclasses.dataclass(frozen=True)
class Key:
    """One schema field as the reference shows it."""

    name: str
    type: str
    default: str
    meaning: str


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment: the block just above it plus the one beside it (and that one's aligned continuation)."""
    lines, _ = inspect.getsourcelines(cls)
    comments: dict[int, tuple[int, str]] = {}  # line -> (column, text)
    for tok in tokenize.generate_tokens(io.StringIO("".join(lines)).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
    code_lines = {i + 1 for i, line in enumerate(lines) if line.strip() and not line.strip().startswith("#")}
    return {node.target.id: _comment_of(node, comments, code_lines)
            for node in ast.walk(ast.parse("".join(lines)))
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}


def _comment_of(node: ast.AnnAssign, comments: dict[int, tuple[int, str]], code_lines: set[int]) -> str:
    """Comment lines at the field's indentation above it, then its trailing comment and aligned continuation."""
    above, i = [], node.lineno - 1
    while i in comments and i not in code_lines and comments[i][0] == node.col_offset:
        above.insert(0, comments[i][1])
        i -= 1
    beside = []
    if node.lineno in comments:
        column, text = comments[node.lineno]
        beside.append(text)
        j = node.lineno + 1
        while j in comments and j not in code_lines and comments[j][0] == column:
            beside.append(comments[j][1])
            j += 1
    return " ".join(above + beside)


def type_name(annotation: Any) -> str:
    """``Optional[List[str]]`` → ``list[str] | null``: the schema's type in the words of a YAML user."""
    text = str(annotation).replace("typing.", "")
    optional = text.startswith("Optional[")
    if optional:
        text = text[len("Optional["):-1]
    text = re.sub(r"List\[", "list[", text).replace("Any", "any")
    return f"{text} | null" if optional else text


def default_text(field: dataclasses.Field) -> str:
    """The default as it would be written in YAML; a required key says so."""
    if field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        value = field.default
    return yaml_value(value)


def yaml_value(value: Any) -> str:
    """One value in YAML flow style (``null``, ``true``, ``[0.9, 0.999]``); a missing value is "required"."""
    if value == "???":
        return "required"
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def schema_keys(cls: type, skip: Any = ()) -> list[Key]:
    """The user-facing keys of one schema dataclass (wiring keys such as ``_target_`` left out)."""
    comments = field_comments(cls)
    return [Key(f.name, type_name(f.type), default_text(f), with_range(comments.get(f.name, ""), f))
            for f in dataclasses.fields(cls) if not f.name.startswith("_") and f.name not in skip]


def with_range(meaning: str, field: dataclasses.Field) -> str:
    """The field's meaning, then the range its schema declares (``ranged``): "… (allowed: ≥ 1)"."""
    rule = field.metadata.get("range")
    if rule is None:
        return meaning
    allowed = f"{rule.length} numbers, each {rule.describe()}" if rule.length else rule.describe()
    return f"{meaning} (allowed: {allowed})".strip()


def builder(cls: type) -> str | None:
    """The ``_target_`` a group's schema builds by default, if any."""
    target = {f.name: f for f in dataclasses.fields(cls)}.get("_target_")
    return target.default if target else None


def top_comment(text: str) -> list[str]:
    """The leading comment block of a YAML file as Markdown lines; indented lines (commands) become code."""
    out: list[str] = []
    in_code = False
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("# @package"):
            continue
        body = line[2:] if line.startswith("# ") else line[1:]
        code = body.startswith("  ")
        if code != in_code:
            out.append("```bash" if code else "```")
            in_code = code
        out.append(body.strip() if code else body.rstrip())
    return out + (["```"] if in_code else [])


def cell(text: str) -> str:
    """Text for a Markdown table cell: RST-style double backticks become single, pipes are escaped."""
    return text.replace("``", "`").replace("|", "\\|")


def flatten(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as ``(dotted.key, value)`` pairs in file order."""
    if isinstance(node, dict) and node:
        return [pair for key, value in node.items() for pair in flatten(value, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), node)]


def describe_defaults(entries: list[Any], group: str) -> list[str]:
    """A YAML defaults list in words: which group choices it makes and which files it extends."""
    out = []
    for entry in entries:
        if entry == "_self_":
            continue
        if isinstance(entry, str):  # `webdataset` (same group) or `/experiment/sdxl_style`
            parent, _, choice = entry.strip("/").rpartition("/")
            out.append(f"extends `{parent or group}={choice}`")
        else:
            out += [f"chooses `{key.removeprefix('override ').strip('/')}={value}`" for key, value in entry.items()]
    return out


def choice_settings(path: Path, group: str) -> list[str]:
    """What one YAML file of a group sets, as ``key=value`` items with the group prefix where Hydra puts it."""
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    items = describe_defaults(data.pop("defaults", []), group)
    sweep = (data.pop("hydra", None) or {}).get("sweeper", {}).get("params", {})
    items += [f"sweeps `{key}` over `{value}`" for key, value in sweep.items()]
    prefix = "" if "@package _global_" in text else f"{group.replace('/', '.')}."
    items += [f"`{prefix}{key}={yaml_value(value)}`" for key, value in flatten(data) if key]
    return items


def default_choices() -> dict[str, str]:
    """The choice ``configs/train.yaml`` makes for each group."""
    entries = yaml.safe_load((CONFIG_DIR / "train.yaml").read_text())["defaults"]
    return {key: str(value) for entry in entries if isinstance(entry, dict) for key, value in entry.items()}


def render_group(name: str, cls: type | None, defaults: dict[str, str]) -> list[str]:
    """The section of one group: its keys, then its choices."""
    out = [f"## `{name}`", ""]
    if name in FOLDER_NOTES:
        out += [FOLDER_NOTES[name], ""]
    if cls is not None:
        doc = (inspect.getdoc(cls) or "").split("\n")[0].replace("``", "`")
        target = builder(cls)
        made_by = f" `_target_`: `{target}`." if target and target not in doc else ""
        out += [f"{doc} Schema: `train.config.{cls.__name__}`.{made_by}", "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{name}.{k.name}` | `{cell(k.type)}` | `{cell(k.default)}` | {cell(k.meaning)} |"
                for k in schema_keys(cls)]
        out.append("")
    folder = CONFIG_DIR / name
    if folder.is_dir():
        chosen = defaults.get(name)
        pick = "ACCELERATE_CONFIG=NAME ./launch.sh" if name == "accelerate" else f"{name}=CHOICE"
        out += [f"Choices (`{pick}`, files in `configs/{name}/`)"
                + (f"; default `{chosen}`:" if chosen not in (None, "None") else ":"), ""]
        for path in sorted(folder.glob("*.yaml")):
            out += render_choice(path, name)
    return out


def render_choice(path: Path, group: str) -> list[str]:
    """One choice: its file's own comment, then what it sets (Accelerate's own keys are not ours to list)."""
    heading = f"ACCELERATE_CONFIG={path.stem}" if group == "accelerate" else f"{group}={path.stem}"
    out = [f"### `{heading}`", ""]
    comment = top_comment(path.read_text())
    if comment:
        out += [*comment, ""]
    settings = [] if group == "accelerate" else choice_settings(path, group)
    if settings:
        out += ["Sets: " + ", ".join(settings) + ".", ""]
    return out


def render() -> str:
    """The whole reference as Markdown."""
    defaults = default_choices()
    out = ["# Configuration reference", "",
           f"Generated from `train/config.py` and `configs/` by `{COMMAND}`; do not edit by hand "
           "(`tests/test_config_reference.py` fails when this file is stale).", "",
           "Set any key on the command line (`python -m train trainer.max_steps=500 optim.lr=3e-4`), choose a "
           "file of a group with `GROUP=CHOICE` (`python -m train model=sdxl`), print the composed config with "
           "`python -m train --cfg job [overrides]`. The schemas hold every default; the YAML files only choose "
           "and override. An unknown key or a value of the wrong type stops with one line.", "",
           "## Top-level keys", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    top = schema_keys(TrainConfig, skip=GROUPS)
    train_yaml = yaml.safe_load((CONFIG_DIR / "train.yaml").read_text())
    for key in top:
        default = yaml_value(train_yaml[key.name]) if key.name in train_yaml else key.default
        out.append(f"| `{key.name}` | `{cell(key.type)}` | `{cell(default)}` | {cell(key.meaning)} |")
    out.append("")
    for name, cls in GROUPS.items():
        out += render_group(name, cls, defaults)
    folders = {str(p.parent.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml") if p.parent != CONFIG_DIR}
    for name in sorted(folders):  # accelerate/, hydra/launcher/
        if name not in GROUPS:
            out += render_group(name, None, defaults)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the reference, or check that a committed copy is current."""
    parser = argparse.ArgumentParser(prog="python -m train.config_reference", description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="write the reference here (e.g. docs/config.md)")
    target.add_argument("--check", type=Path, help="exit 1 if this file differs from what --out would write")
    args = parser.parse_args(argv)
    text = render()
    if args.check is not None:
        current = args.check.read_text() if args.check.is_file() else ""
        if current != text:
            print(f"error: {args.check} is stale; run: {COMMAND}", file=sys.stderr)
            return 1
        print(f"{args.check} is current")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
