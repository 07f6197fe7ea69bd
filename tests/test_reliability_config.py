"""Every config value is checked against the schema in one place, and every bad input to training is one line.

Ranges are declared beside each default in train/config.py (``ranged``) and enforced by ``check_ranges``,
which also refuses inf/NaN everywhere; hostile ``adapter.init_from`` files, tampered checkpoint state
and failures inside Hydra's builders end in one line too.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from train.config import ConfigError, check_sections, compose


@pytest.mark.parametrize("override, message", [
    ("optim.betas=[0.9]", "optim.betas must be 2 numbers in [0, 1)"),
    ("optim.betas=[0.9,1.5]", "optim.betas must be in [0, 1)"),
    ("optim.eps=inf", "optim.eps must be a finite number"),
    ("optim.lr=nan", "optim.lr must be a finite number"),
    ("trainer.seed=4294967296", "trainer.seed must be in [0, 4294967295]"),
    ("trainer.collective_timeout_s=99999999999", "trainer.collective_timeout_s must be in [60, 604800]"),
    ("data.shards=123", "data.shards=123 — give a glob"),
    ("data.shards=null", "data.shards=None — give a glob"),
    ("data.resolution=1", "data.resolution must be ≥ 8"),
    ("data.clip_std=[0.2,0,0.2]", "data.clip_std must be > 0"),
    ("blocks.targets=[]", "blocks.targets=[] selects no block"),
    ("trainer.ema=1.5", "trainer.ema must be in (0, 1)"),
    ("trainer.max_steps=0", "trainer.max_steps must be ≥ 1 (got 0)"),
    ("adapter.num_tokens=1000000000", "adapter.num_tokens must be in [1, 1024]"),
    ("validation.content_scale=inf", "validation.content_scale must be a finite number"),
])
def test_values_outside_the_schema_ranges_are_one_line(override, message):
    overrides = ["model.path=x", override] + ([] if override.startswith("data.shards") else ["data.shards=x"])
    with pytest.raises(ConfigError) as err:
        check_sections(compose(overrides))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_block_list_given_as_a_string_is_named_not_split_into_letters():
    from train.config import BlocksConfig

    with pytest.raises(ConfigError, match="must be a list of block names") as err:
        BlocksConfig(targets="garbage")
    assert "'g'" not in str(err.value)


def test_model_path_that_is_a_device_is_one_line(tiny_model_dir, shards, tmp_path):
    from tests.helpers import tiny_overrides
    from train.checks import check_config

    with pytest.raises(ConfigError, match="model.path=/dev/null is a file, not a folder"):
        check_config(compose(tiny_overrides(tiny_model_dir, shards, tmp_path / "run", "model.path=/dev/null")))


@pytest.mark.parametrize("where", ["/proc/run", "/sys/run", ""])
def test_output_dir_under_a_system_root_or_empty_is_one_line(tiny_model_dir, shards, where):
    from tests.helpers import tiny_overrides
    from train.checks import check_config

    with pytest.raises(ConfigError, match="under /|is empty") as err:
        check_config(compose(tiny_overrides(tiny_model_dir, shards, where)))
    assert "\n" not in str(err.value)


# --- the entry point's last line of defence ---------------------------------------------------------

@pytest.mark.parametrize("error, needle", [
    (MemoryError(), "out of memory: lower trainer.batch_size"),
    ("INSTANTIATION", "cannot build the thing"),
])
def test_memory_and_builder_failures_end_in_one_line(monkeypatch, capsys, tmp_path, error, needle):
    from hydra.errors import InstantiationException

    import train.training
    from train.__main__ import main

    if error == "INSTANTIATION":
        try:
            raise InstantiationException("Error in call to target 'x':\nmore") from ValueError("cannot build the thing\n2")
        except InstantiationException as wrapped:
            error = wrapped

    def fail(cfg):
        raise error

    monkeypatch.setattr(train.training, "train", fail)
    monkeypatch.setattr("train.sweep_points.hand_over_to_launch_sh", lambda output_dir: None)  # not a sweep point
    with pytest.raises(SystemExit) as exit_info:
        main(compose(["model.path=x", "data.shards=x", f"output_dir={tmp_path}"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0]


# --- hostile adapter.init_from files ------------------------------------------------------------------

def _hostile(kind: str, good: dict, folder) -> str:
    path = folder / f"{kind.replace(' ', '_')}.safetensors"
    tensors, metadata = dict(good[0]), dict(good[1])
    if kind == "flat projection":
        tensors["image_proj.proj.weight"] = torch.zeros(8)
    elif kind == "no projection":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("image_proj.")}
    elif kind == "deep metadata":
        metadata["target_blocks"] = "[" * 100000 + "]" * 100000
    elif kind == "nan":
        tensors["image_proj.proj.weight"] = torch.full_like(tensors["image_proj.proj.weight"], float("nan"))
    elif kind == "wrong shape":
        tensors["image_proj.proj.weight"] = torch.zeros(3, 5)
    elif kind == "integer weights":
        tensors["image_proj.proj.weight"] = tensors["image_proj.proj.weight"].to(torch.int32)
    elif kind == "text file":
        path.write_text("not an adapter")
        return str(path)
    elif kind == "pickle":
        path = folder / "x.bin"
        path.write_bytes(b"\x80\x04\x95garbage")
        return str(path)
    save_file(tensors, str(path), metadata=metadata)
    return str(path)


@pytest.mark.parametrize("kind", ["flat projection", "no projection", "deep metadata", "nan", "wrong shape",
                                  "integer weights", "text file", "pickle"])
def test_hostile_init_from_files_are_one_line(tiny_model_dir, tmp_path, kind):
    from generate_support import STYLE, export_perturbed

    from instantstyle.export import read_adapter_file
    from instantstyle.models import load_base
    from train.builders import build_adapter

    good = read_adapter_file(export_perturbed(tiny_model_dir, STYLE, tmp_path / "good.safetensors"))
    path = _hostile(kind, good, tmp_path)
    with pytest.raises(ConfigError) as err:
        build_adapter(load_base(tiny_model_dir), blocks=list(STYLE), type="ip_adapter", num_tokens=4,
                      resampler_dim=1280, init_from=path)
    assert str(err.value).startswith(f"adapter.init_from={path}: ") and "\n" not in str(err.value)
    assert len(str(err.value)) < 400


# --- a tampered checkpoint ------------------------------------------------------------------------------

@pytest.mark.parametrize("pending", [["adapter"], ["ranks"], 5, [["x"]]])
def test_a_tampered_pending_list_makes_the_checkpoint_unusable(tmp_path, pending):
    from train.checkpoint import STATE_FILE, CheckpointError, CheckpointManager, verify_checkpoint

    manager = CheckpointManager(tmp_path, keep=1)
    folder = manager.save(1, {"adapter": torch.nn.Linear(2, 2).state_dict(), "optimizer": {}, "lr_scheduler": {},
                              "ranks": [{}]}, {"step": 1}, "")
    state = json.loads((folder / STATE_FILE).read_text())
    (folder / STATE_FILE).write_text(json.dumps({**state, "pending": pending}))
    with pytest.raises(CheckpointError, match="pending") as err:
        verify_checkpoint(folder)
    assert "\n" not in str(err.value)
