"""An export is a folder another person can use: weights, model card, training record, samples; no local paths."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open

from instantstyle.export import export_safetensors, read_adapter_file
from instantstyle.model_ids import portable_id, same_model
from tests.helpers import tiny_overrides
from train.config import compose
from train.export import main as export_main
from train.training import train

STYLE = "up_blocks.0.attentions.1"
SHARED = {"ip-adapter.safetensors", "README.md", "training.json", "samples.png"}


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, shards, tmp_path_factory):
    """A 2-step run with style references (validation at step 2), so its export has a sample grid."""
    from data_tools.synthetic import content_caption, render, sample_attributes

    styles = tmp_path_factory.mktemp("styles")
    attributes = sample_attributes(np.random.default_rng(0))
    render(attributes, 64).save(styles / "style0.png")
    (styles / "style0.txt").write_text(content_caption(attributes))
    out = tmp_path_factory.mktemp("share") / "run"
    train(compose(tiny_overrides(tiny_model_dir, shards, out, "trainer.max_steps=2", "optim.lr=1e-3",
                                 f"validation.styles={styles}", "validation.prompts=[a circle]",
                                 "validation.every=2", "validation.steps=2")))
    return out


def local_paths(*paths: str | Path) -> list[bytes]:
    """Absolute paths of this machine that must never appear in an export, as bytes."""
    return [str(Path(p).resolve()).encode() for p in paths] + [str(p).encode() for p in paths]


def assert_no_local_path(folder: Path, *paths: str | Path) -> None:
    for file in folder.iterdir():
        data = file.read_bytes()
        for path in local_paths(*paths):
            assert path not in data, f"{file.name} holds the local path {path.decode()}"


def test_end_of_run_writes_a_shareable_folder_without_local_paths(finished_run, tiny_model_dir, shards):
    folder = finished_run / "export"
    assert {p.name for p in folder.iterdir()} == SHARED
    assert (finished_run / "ip-adapter.safetensors").samefile(folder / "ip-adapter.safetensors")
    assert_no_local_path(folder, finished_run.parent, tiny_model_dir, shards)
    _, meta = read_adapter_file(folder / "ip-adapter.safetensors")
    assert re.fullmatch(r"base@sha256-[0-9a-f]{12}", meta["base_model"])
    assert re.fullmatch(r"base@sha256-[0-9a-f]{12}:image_encoder", meta["image_encoder"])


def test_training_record_says_what_made_the_adapter(finished_run):
    record = json.loads((finished_run / "export" / "training.json").read_text())
    assert record["adapter"]["target_blocks"] == [STYLE] and record["adapter"]["type"] == "ip_adapter"
    assert (record["adapter"]["trained_layers"], record["adapter"]["all_layers"]) == (2, 22)
    assert record["training"]["steps"] == 2 and record["training"]["samples_seen"] == 4
    assert record["training"]["lr"] == 1e-3 and record["data"] == {**record["data"], "shards": 4, "samples": 32}
    validation = record["metrics"]["validation"]["final"]
    assert validation["step"] == 2 and "style_similarity" in validation["mean"]
    assert record["usage"]["diffusers_scale"] == {"up": {"block_0": [0.0, 1.0, 0.0]}}
    assert record["samples"] == "samples.png" and record["base_model"].startswith("base@sha256-")


def test_model_card_has_hub_front_matter_and_usage(finished_run):
    card = (finished_run / "export" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "diffusers" and front["pipeline_tag"] == "text-to-image"
    assert {"ip-adapter", "instantstyle", "stable-diffusion-xl"} <= set(front["tags"])
    assert "base_model" not in front  # a local base has no Hub id to link
    assert "# license:" in card and "![samples](samples.png)" in card
    assert 'pipe.set_ip_adapter_scale({"up": {"block_0": [0.0, 1.0, 0.0]}})' in card
    assert "Not loadable by ComfyUI_IPAdapter_plus" in card  # the tiny UNet is not a layout ComfyUI numbers


def test_card_diffusers_snippet_runs_as_written(finished_run, tiny_model_dir, tmp_path, monkeypatch):
    from PIL import Image

    card = (finished_run / "export" / "README.md").read_text()
    code = card.split("```python\n")[1].split("```")[0]
    code = code.replace("PATH/TO/base", tiny_model_dir).replace("num_inference_steps=30", "num_inference_steps=2")
    code = code.replace('adapter = "."', f'adapter = "{finished_run / "export"}"')
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "style.png")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "card", "exec"), {})
    assert Image.open(tmp_path / "cat.png").size == (64, 64)


def test_export_cli_writes_the_same_folder_to_a_folder_or_beside_a_file(finished_run, tmp_path, capsys):
    checkpoint = finished_run / "checkpoints" / "checkpoint-00000002"
    export_main([str(checkpoint), "--out", str(tmp_path / "shared")])  # DIR is made; FILE's folder must exist
    (tmp_path / "beside").mkdir()
    export_main([str(checkpoint), "--out", str(tmp_path / "beside" / "style.safetensors")])
    assert {p.name for p in (tmp_path / "shared").iterdir()} == SHARED
    assert {p.name for p in (tmp_path / "beside").iterdir()} == SHARED - {"ip-adapter.safetensors"} | {"style.safetensors"}
    assert (tmp_path / "shared" / "ip-adapter.safetensors").read_bytes() == \
        (finished_run / "ip-adapter.safetensors").read_bytes()  # no EMA: the export of the run, byte for byte
    record = json.loads((tmp_path / "beside" / "training.json").read_text())
    assert record["adapter"]["weights_file"] == "style.safetensors"
    assert "weight_name=\"style.safetensors\"" in (tmp_path / "beside" / "README.md").read_text()
    assert_no_local_path(tmp_path / "shared", finished_run.parent)


def test_export_cli_refuses_an_out_that_is_a_file(finished_run, tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(finished_run / "checkpoints" / "checkpoint-00000002"), "--out", str(tmp_path / "taken")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: --out") and "is a file" in err and "\n" not in err


def test_portable_ids_hide_folders_but_identify_the_model(tiny_model_dir, tmp_path):
    copy = tmp_path / "elsewhere" / "base"
    shutil.copytree(Path(tiny_model_dir) / "unet", copy / "unet")
    shutil.copy(Path(tiny_model_dir) / "model_index.json", copy / "model_index.json")
    assert portable_id(tiny_model_dir) == portable_id(str(copy))  # same configs, same id
    assert str(tmp_path) not in portable_id(str(copy)) and "/" not in portable_id(str(copy))
    assert portable_id("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert portable_id("h94/IP-Adapter:sdxl_models/image_encoder") == "h94/IP-Adapter:sdxl_models/image_encoder"
    snapshot = tmp_path / "hub" / "models--stabilityai--sdxl-turbo" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert portable_id(str(snapshot)) == "stabilityai/sdxl-turbo"
    assert portable_id(str(copy), hub_id="me/my-sdxl") == "me/my-sdxl"
    assert portable_id(portable_id(str(copy))) == portable_id(str(copy))
    assert same_model(portable_id(tiny_model_dir), str(copy))


def test_library_export_never_writes_a_local_path(tiny_base, tmp_path):
    from instantstyle.adapter import AdapterSpec, install_adapter

    adapter = install_adapter(tiny_base.unet, AdapterSpec("ip_adapter", (STYLE,), 32, 4))
    path = export_safetensors(adapter, tiny_base.unet, tmp_path / "a.safetensors", base_model=tiny_base.path,
                              image_encoder=tiny_base.image_encoder_path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert tiny_base.path.encode() not in path.read_bytes()
    assert meta["base_model"] == portable_id(tiny_base.path)


def test_hub_id_setting_names_a_local_copy(tiny_model_dir):
    from omegaconf import OmegaConf

    from train.record import model_ids

    cfg = OmegaConf.create({"model": {"hub_id": "me/tiny-sdxl"}})
    assert model_ids(cfg, tiny_model_dir, f"{tiny_model_dir}:image_encoder") == \
        ("me/tiny-sdxl", "me/tiny-sdxl:image_encoder")
    assert model_ids(cfg, tiny_model_dir, "h94/IP-Adapter:sdxl_models/image_encoder")[1] == \
        "h94/IP-Adapter:sdxl_models/image_encoder"  # an encoder from elsewhere keeps its own id
    assert os.sep not in model_ids(OmegaConf.create({}), tiny_model_dir, tiny_model_dir)[0]


def released_file(tiny_model_dir, tmp_path, layout: str, adapter_type: str = "ip_adapter") -> tuple[Path, dict]:
    """An all-layer adapter saved as the public ones are: fp16, no metadata, flat (diffusers/ComfyUI) or nested .bin."""
    from instantstyle.adapter import AdapterSpec, install_adapter
    from instantstyle.blocks import ALL_BLOCKS
    from instantstyle.models import load_base
    from safetensors.torch import save_file
    from tests.helpers import perturb_

    unet = load_base(tiny_model_dir).unet
    tokens = 16 if adapter_type == "ip_adapter_plus" else 4
    full = install_adapter(unet, AdapterSpec(adapter_type, ALL_BLOCKS, 32, tokens, 64))
    perturb_(full)
    tensors, _ = read_adapter_file(export_safetensors(full, unet, tmp_path / "ours.safetensors", dtype="fp16"))
    if layout == "flat":
        path = tmp_path / "ip-adapter_released.safetensors"
        save_file(tensors, str(path))
    else:
        path = tmp_path / "ip-adapter_released.bin"
        torch.save({g: {k.removeprefix(g + "."): v for k, v in tensors.items() if k.startswith(g + ".")}
                    for g in ("image_proj", "ip_adapter")}, path)
    return path, tensors


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_init_from_a_released_file_takes_its_projection_and_only_the_chosen_blocks(tiny_model_dir, tmp_path, layout):
    from train.builders import build_adapter, build_base

    path, tensors = released_file(tiny_model_dir, tmp_path, layout)
    base = build_base(tiny_model_dir)
    adapter = build_adapter(base, blocks=[STYLE], type="ip_adapter", num_tokens=4, resampler_dim=1280,
                            init_from=str(path))
    assert adapter.layer_names and all(n.startswith(STYLE + ".") for n in adapter.layer_names)
    assert torch.equal(adapter.image_proj.proj.weight, tensors["image_proj.proj.weight"].float())
    for key_id, proc in zip(adapter.export_ids(), adapter.layers):
        assert proc.to_v_ip.weight.dtype == torch.float32
        assert torch.equal(proc.to_v_ip.weight, tensors[f"ip_adapter.{key_id}.to_v_ip.weight"].float())
    assert adapter.spec.extra["base_model"] == base.path  # this run's provenance, not the file's


@pytest.mark.parametrize("config,needle", [
    ({"type": "ip_adapter_plus", "num_tokens": 16, "resampler_dim": 64}, "the file's type is ip_adapter, the config's ip_adapter_plus"),
    ({"type": "ip_adapter", "num_tokens": 8, "resampler_dim": 1280}, "the file's image tokens is 4, the config's 8; set adapter.num_tokens=4"),
])
def test_init_from_a_file_that_is_another_adapter_is_one_line(tiny_model_dir, tmp_path, config, needle):
    from train.builders import build_adapter, build_base
    from train.config import ConfigError

    path, _ = released_file(tiny_model_dir, tmp_path, "flat")
    with pytest.raises(ConfigError) as err:
        build_adapter(build_base(tiny_model_dir), blocks=[STYLE], init_from=str(path), **config)
    assert needle in str(err.value) and str(err.value).startswith("adapter.init_from=") and "\n" not in str(err.value)


def test_init_from_a_file_for_another_base_is_a_config_error(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    from train.builders import build_adapter, build_base
    from train.config import ConfigError

    path, tensors = released_file(tiny_model_dir, tmp_path, "flat")
    # As if made for a UNet with fewer cross-attention layers (an SD 1.5 file on an SDXL base).
    save_file({k: v for k, v in tensors.items() if not k.startswith("ip_adapter.43.")}, str(path))
    with pytest.raises(ConfigError, match=r"^adapter.init_from=.*does not fit this base model"):
        build_adapter(build_base(tiny_model_dir), blocks=[STYLE], type="ip_adapter", num_tokens=4,
                      resampler_dim=1280, init_from=str(path))


def test_compact_export_holds_trained_layers_only_and_loads_as_the_full_one(finished_run, tiny_model_dir, tmp_path):
    from instantstyle.models import load_base
    from instantstyle.pipeline import read_checked_adapter, trained_for

    checkpoint = finished_run / "checkpoints" / "checkpoint-00000002"
    export_main([str(checkpoint), "--out", str(tmp_path / "compact"), "--compact"])
    compact = tmp_path / "compact" / "ip-adapter.safetensors"
    full = finished_run / "export" / "ip-adapter.safetensors"
    tensors, meta = read_adapter_file(compact)
    trained = {k.split(".")[1] for k, v in read_adapter_file(full)[0].items() if k.endswith("to_v_ip.weight") and v.any()}
    assert meta["layout"] == "compact" and {k.split(".")[1] for k in tensors if k.startswith("ip_adapter.")} == trained
    assert compact.stat().st_size < full.stat().st_size / 3
    unet = load_base(tiny_model_dir).unet
    nested_compact, spec = read_checked_adapter(compact, unet)
    nested_full, _ = read_checked_adapter(full, unet)
    assert spec.blocks == (STYLE,)
    for group in nested_full:  # diffusers receives exactly what it gets from the full file
        assert nested_full[group].keys() == nested_compact[group].keys()
        assert all(torch.equal(nested_full[group][k], nested_compact[group][k]) for k in nested_full[group])
    card = (tmp_path / "compact" / "README.md").read_text()
    assert "compact export" in card and "set_ip_adapter_scale" not in card
    assert json.loads((tmp_path / "compact" / "training.json").read_text())["adapter"]["layout"] == "compact"
    assert trained_for(meta, tiny_model_dir) == ""  # the base check still recognises the base it was trained on


def test_compact_export_on_another_base_is_one_line(finished_run, tmp_path):
    from diffusers import UNet2DConditionModel

    from instantstyle.errors import AdapterFileError
    from instantstyle.export import load_adapter

    export_main([str(finished_run / "checkpoints" / "checkpoint-00000002"), "--out", str(tmp_path / "c"), "--compact"])
    config = dict(UNet2DConditionModel.load_config(json.loads((finished_run / "checkpoints" / "checkpoint-00000002"
                                                              / "trainer_state.json").read_text())["identity"]["base_model"],
                                                   subfolder="unet"))
    config["transformer_layers_per_block"] = [1, 1, 1]
    with pytest.raises(AdapterFileError, match=r"made for 22 cross-attention layers, the base model has 11$"):
        load_adapter(tmp_path / "c" / "ip-adapter.safetensors", UNet2DConditionModel.from_config(config))


def test_usage_of_a_partly_trained_block_falls_back_to_one_scale(tiny_base):
    from instantstyle.adapter import AdapterSpec, install_adapter
    from instantstyle.model_card import usage_for_unet

    layer = f"{STYLE}.transformer_blocks.0"  # one of the block's two layers
    adapter = install_adapter(tiny_base.unet, AdapterSpec("ip_adapter", (layer,), 32, 4))
    usage = usage_for_unet(tiny_base.unet, adapter.spec)
    assert usage["diffusers_scale"] == 1.0 and usage["comfyui"]["transformer_indices"] == [6]
