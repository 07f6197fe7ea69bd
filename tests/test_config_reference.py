"""docs/config.md is what `python -m train.config_reference` writes from the schemas and the YAML files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from train import config_reference
from train.config import CONFIG_DIR, GROUPS, TrainConfig

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "docs" / "config.md"


def test_committed_config_reference_is_current():
    assert COMMITTED.read_text() == config_reference.render(), (
        f"docs/config.md is stale: run `{config_reference.COMMAND}` and commit it")


def test_reference_lists_every_schema_key_with_its_default():
    text = config_reference.render()
    for group, schema in GROUPS.items():
        for field in dataclasses.fields(schema):
            if not field.name.startswith("_"):
                default = config_reference.default_text(field).replace("|", "\\|")
                assert f"| `{group}.{field.name}` | " in text and f"| `{default}` |" in text, f"{group}.{field.name}"
    assert "| `resume` | `str \\| null` | `auto` |" in text  # top-level keys, defaults as train.yaml sets them


def test_reference_lists_every_choice_of_every_group_with_what_it_sets():
    text = config_reference.render()
    for path in CONFIG_DIR.glob("*/*.yaml"):
        group = path.parent.name
        heading = f"ACCELERATE_CONFIG={path.stem}" if group == "accelerate" else f"{group}={path.stem}"
        assert f"### `{heading}`" in text, path
    assert "chooses `model=toy`" in text and "`blocks.targets=[up_blocks.1.attentions.2]`" in text  # experiment=demo
    assert "sweeps `optim.lr` over" in text  # block_lr_sweep's Hydra sweeper params
    assert "`data.resolution=64`" in text  # model=toy is a global package: its data.* keys keep their group


def test_field_comments_are_the_meaning_and_do_not_leak_into_the_next_field():
    meanings = {k.name: k.meaning for k in config_reference.schema_keys(GROUPS["trainer"])}
    assert meanings["mixed_precision"].endswith("no on CPU")  # the aligned continuation line belongs to it
    assert meanings["allow_tf32"].startswith("TF32")
    data = {k.name: k.meaning for k in config_reference.schema_keys(GROUPS["data"])}
    assert data["buckets"].startswith("Aspect-ratio buckets")  # the block comment above the field
    assert {k.name for k in config_reference.schema_keys(TrainConfig, skip=GROUPS)} == {"output_dir", "resume"}


def test_check_mode_names_the_command_when_stale(tmp_path, capsys):
    stale = tmp_path / "config.md"
    stale.write_text("old\n")
    assert config_reference.main(["--check", str(stale)]) == 1
    assert config_reference.COMMAND in capsys.readouterr().err
    assert config_reference.main(["--out", str(stale)]) == 0
    assert config_reference.main(["--check", str(stale)]) == 0
