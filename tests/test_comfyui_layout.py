"""Our SDXL and SD 1.5 exports satisfy ComfyUI_IPAdapter_plus's detection and layer numbering.

The rules below are written from what that loader does (issue 21), not from our exporter:
- ``IPAdapterModelLoader`` splits a .safetensors file by the prefixes ``image_proj.`` and ``ip_adapter.``;
- SDXL when ``ip_adapter["1.to_k_ip.weight"].shape[1] == 2048``; Plus when ``latents`` is in image_proj;
  Full when ``proj.3.weight`` is;
- layer number n reads keys ``{2n+1}.to_k_ip`` / ``{2n+1}.to_v_ip``, numbered over (SDXL) input blocks
  4, 5 (2 layers each), 7, 8 (10 each), output blocks 0-2 (10 each), 3-5 (2 each), middle (10): 70 layers;
  (SD 1.5) input 1, 2, 4, 5, 7, 8, output 3-11, middle, one layer each: 16 layers;
- its weight types address a SpatialTransformer's ``transformer_index``, which ComfyUI counts as the UNet
  runs: input blocks, then the middle, then output blocks. "style transfer" is index 6 on SDXL,
  "composition" index 3.
The UNets are the real SDXL / SD 1.5 layouts (block types, depths, text width) at a few channels wide.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from instantstyle.adapter import AdapterSpec, install_adapter
from instantstyle.blocks import preset_blocks
from instantstyle.export import export_safetensors
from instantstyle.model_card import comfyui_problem, usage_for_unet
from instantstyle.reference_configs import load_reference_config
from tests.helpers import perturb_

NARROW = {"block_out_channels": [8, 16, 32], "attention_head_dim": [1, 2, 4], "norm_num_groups": 8}
LAYERS_PER_BLOCK = 2  # resnets per UNet stage in both SDXL and SD 1.5


def narrow_unet(family: str) -> UNet2DConditionModel:
    """The family's real UNet layout with 8-32 channels: same blocks, depths and cross-attention width."""
    if family == "sdxl":
        config = {**load_reference_config("sdxl_unet"), **NARROW}
    else:
        config = {**load_reference_config("sd15_unet"), "block_out_channels": [8, 16, 32, 32],
                  "attention_head_dim": 2, "norm_num_groups": 8}
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(config)


def comfyui_load(path) -> dict[str, dict[str, torch.Tensor]]:
    """IPAdapterModelLoader on a .safetensors file: split by prefix."""
    model = {"image_proj": {}, "ip_adapter": {}}
    for key, value in load_file(str(path)).items():
        for group in model:
            if key.startswith(group + "."):
                model[group][key[len(group) + 1:]] = value
    return model


def comfyui_kind(model: dict) -> dict[str, bool]:
    return {"sdxl": model["ip_adapter"]["1.to_k_ip.weight"].shape[1] == 2048,
            "plus": "latents" in model["image_proj"], "full": "proj.3.weight" in model["image_proj"]}


def comfyui_patched_blocks(sdxl: bool) -> list[tuple[str, int, int]]:
    """(kind, block id, transformer depth) in the order ComfyUI numbers the layers."""
    if sdxl:
        return ([("input", i, 2 if i in (4, 5) else 10) for i in (4, 5, 7, 8)]
                + [("output", i, 10 if i < 3 else 2) for i in range(6)] + [("middle", 0, 10)])
    return ([("input", i, 1) for i in (1, 2, 4, 5, 7, 8)] + [("output", i, 1) for i in range(3, 12)]
            + [("middle", 0, 1)])


def comfyui_numbers(sdxl: bool) -> dict[tuple[str, int], list[int]]:
    """Each patched block's layer numbers n (keys 2n+1)."""
    numbers, n = {}, 0
    for kind, block, depth in comfyui_patched_blocks(sdxl):
        numbers[(kind, block)] = list(range(n, n + depth))
        n += depth
    return numbers


def comfyui_transformer_index(sdxl: bool) -> dict[tuple[str, int], int]:
    """Execution order of the patched blocks: input, middle, output."""
    blocks = [(k, b) for k, b, _ in comfyui_patched_blocks(sdxl)]
    ordered = [b for b in blocks if b[0] == "input"] + [("middle", 0)] + [b for b in blocks if b[0] == "output"]
    return {block: i for i, block in enumerate(ordered)}


def diffusers_block(kind: str, block: int) -> str:
    """ComfyUI's input/output block id -> diffusers attention block (each stage: 2 resnets + a resample)."""
    if kind == "middle":
        return "mid_block.attentions.0"
    if kind == "input":
        return f"down_blocks.{(block - 1) // (LAYERS_PER_BLOCK + 1)}.attentions.{(block - 1) % (LAYERS_PER_BLOCK + 1)}"
    return f"up_blocks.{block // (LAYERS_PER_BLOCK + 1)}.attentions.{block % (LAYERS_PER_BLOCK + 1)}"


def exported(family: str, blocks, tmp_path):
    unet = narrow_unet(family)
    adapter = install_adapter(unet, AdapterSpec("ip_adapter", tuple(blocks), 32, 4))
    perturb_(adapter)
    path = export_safetensors(adapter, unet, tmp_path / "ip-adapter.safetensors")
    return unet, adapter, comfyui_load(path)


@pytest.mark.parametrize("family,preset", [("sdxl", "style"), ("sdxl", "layout"), ("sd15", "style")])
def test_comfyui_numbers_the_trained_block_as_we_do(family, preset, tmp_path):
    unet, adapter, model = exported(family, preset_blocks(preset, family), tmp_path)
    kind = comfyui_kind(model)
    assert kind == {"sdxl": family == "sdxl", "plus": False, "full": False}
    numbers = comfyui_numbers(kind["sdxl"])
    assert sum(len(n) for n in numbers.values()) == (70 if family == "sdxl" else 16)
    assert {int(k.split(".")[0]) for k in model["ip_adapter"]} == {2 * n + 1 for ns in numbers.values() for n in ns}
    trained = dict(zip(adapter.layer_names, adapter.layers))
    seen = set()
    for (kind_, block), ns in numbers.items():
        name = diffusers_block(kind_, block)
        for depth, n in enumerate(ns):
            layer = f"{name}.transformer_blocks.{depth}.attn2.processor"
            to_k, to_v = model["ip_adapter"][f"{2 * n + 1}.to_k_ip.weight"], model["ip_adapter"][f"{2 * n + 1}.to_v_ip.weight"]
            # ComfyUI builds Linear(shape[1], shape[0]) and applies it where it patched: widths must match there.
            assert to_k.shape == unet.get_submodule(layer.removesuffix(".processor")).to_k.weight.shape
            if layer in trained:
                assert torch.equal(to_v, trained[layer].to_v_ip.weight.detach())
                seen.add(layer)
            else:
                assert torch.count_nonzero(to_v) == 0
    assert seen == set(trained)  # every trained layer sits where ComfyUI numbers its block


@pytest.mark.parametrize("preset,weight_type", [("style", "style transfer"), ("layout", "composition"),
                                                ("style_layout", "style and composition")])
def test_comfyui_weight_type_of_the_card_addresses_exactly_the_trained_blocks(preset, weight_type, tmp_path):
    unet, adapter, model = exported("sdxl", preset_blocks(preset, "sdxl"), tmp_path)
    addressed = {"style transfer": {6}, "composition": {3}, "style and composition": {3, 6}}[weight_type]
    index = comfyui_transformer_index(sdxl=True)
    blocks = {diffusers_block(*block) for block, i in index.items() if i in addressed}
    assert blocks == {name.split(".transformer_blocks")[0] for name in adapter.layer_names}
    usage = usage_for_unet(unet, adapter.spec)["comfyui"]
    assert usage["loads"] and usage["weight_type"] == weight_type
    assert set(usage["transformer_indices"]) == addressed


def test_sd15_style_blocks_get_comfyui_layer_weights_of_their_indices(tmp_path):
    unet, adapter, _ = exported("sd15", preset_blocks("style", "sd15"), tmp_path)
    index = comfyui_transformer_index(sdxl=False)
    wanted = sorted(i for block, i in index.items() if diffusers_block(*block).startswith("up_blocks.1."))
    usage = usage_for_unet(unet, adapter.spec)["comfyui"]
    assert wanted == [7, 8, 9]
    assert usage["loads"] and usage["weight_type"] == "linear"
    assert usage["layer_weights"] == ",".join(f"{i}:1" for i in wanted)


def test_plus_files_are_detected_and_comfyui_limits_are_stated(tmp_path):
    unet = narrow_unet("sdxl")
    adapter = install_adapter(unet, AdapterSpec("ip_adapter_plus", ("up_blocks.0.attentions.1",), 32, 4, 64))
    model = comfyui_load(export_safetensors(adapter, unet, tmp_path / "plus.safetensors"))
    assert comfyui_kind(model) == {"sdxl": True, "plus": True, "full": False}
    problem = comfyui_problem(70, family="sdxl", cross_attention_dim=2048, adapter_type="ip_adapter_plus",
                              num_tokens=4, resampler_dim=64)
    assert "16 tokens of width 1280" in problem
    assert comfyui_problem(70, family="sdxl", cross_attention_dim=2048, adapter_type="ip_adapter_plus",
                           num_tokens=16, resampler_dim=1280) is None
