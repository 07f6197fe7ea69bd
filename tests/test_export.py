"""Exports load in stock diffusers with identical outputs, round-trip bit-exactly, and reject misfits."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from instantstyle.adapter import AdapterSpec, attention_module, install_adapter
from instantstyle.blocks import ALL_BLOCKS, cross_attention_layers
from instantstyle.export import AdapterFileError, export_safetensors, load_adapter, read_adapter_file
from tests.helpers import perturb_, run_unet, unet_inputs

BLOCKS = {
    "style": ("up_blocks.0.attentions.1",),
    "style_layout": ("up_blocks.0.attentions.1", "down_blocks.2.attentions.1"),
    "all": ALL_BLOCKS,
}
# diffusers' per-block scale dict for each preset on the tiny (SDXL-shaped) UNet.
DIFFUSERS_SCALES = {
    "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
    "style_layout": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
    "all": 1.0,
}


def _trained_adapter(unet, preset, adapter_type):
    plus = adapter_type == "ip_adapter_plus"
    spec = AdapterSpec(adapter_type, BLOCKS[preset], 32, 16 if plus else 4, resampler_dim=64)
    adapter = install_adapter(unet, spec)
    perturb_(adapter)
    return adapter


def _features(adapter_type):
    g = torch.Generator().manual_seed(5)
    return torch.randn((2, 50, 32) if adapter_type == "ip_adapter_plus" else (2, 32), generator=g)


@pytest.mark.parametrize("adapter_type", ["ip_adapter", "ip_adapter_plus"])
@pytest.mark.parametrize("preset", ["style", "style_layout", "all"])
def test_stock_diffusers_matches_our_unet(tiny_model_dir, tiny_base, tmp_path, preset, adapter_type):
    unet = tiny_base.unet
    adapter = _trained_adapter(unet, preset, adapter_type)
    export_safetensors(adapter, unet, tmp_path / "ip-adapter.safetensors")
    inputs = unet_inputs(unet)
    features = _features(adapter_type)
    ours = run_unet(unet, inputs, adapter.image_tokens(features))

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip-adapter.safetensors")
    pipe.set_ip_adapter_scale(DIFFUSERS_SCALES[preset])
    cond = dict(inputs["added_cond_kwargs"], image_embeds=[features.unsqueeze(1)])
    with torch.no_grad():
        stock = pipe.unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["text"],
                          added_cond_kwargs=cond).sample
    assert ((ours - stock).norm() / stock.norm()).item() < 1e-4
    assert (ours - run_unet(pipe.unet.__class__.from_pretrained(tiny_model_dir, subfolder="unet"),
                            inputs)).abs().max() > 1e-3  # the adapter really changes the output


def test_untrained_layers_are_inert_in_the_file(tiny_base, tmp_path):
    unet = tiny_base.unet
    adapter = _trained_adapter(unet, "style", "ip_adapter")
    path = export_safetensors(adapter, unet, tmp_path / "a.safetensors")
    tensors, _ = read_adapter_file(path)
    layers = cross_attention_layers(unet.attn_processors)
    assert {k for k in tensors if k.startswith("ip_adapter.")} == {
        f"ip_adapter.{2 * i + 1}.{w}.weight" for i in range(len(layers)) for w in ("to_k_ip", "to_v_ip")}
    for i, name in enumerate(layers):
        to_v = tensors[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"]
        if name in adapter.layer_names:
            assert to_v.abs().sum() > 0
        else:
            assert torch.count_nonzero(to_v) == 0
            assert torch.equal(tensors[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"],
                               attention_module(unet, name).to_k.weight)


def test_metadata_is_written_and_read_back(tiny_base, tmp_path):
    unet = tiny_base.unet
    adapter = _trained_adapter(unet, "style_layout", "ip_adapter")
    path = export_safetensors(adapter, unet, tmp_path / "a.safetensors", base_model="tiny",
                              image_encoder="tiny:image_encoder", step=42)
    _, meta = read_adapter_file(path)
    assert json.loads(meta["target_blocks"]) == list(BLOCKS["style_layout"])
    assert (meta["adapter_type"], meta["num_tokens"], meta["step"]) == ("ip_adapter", "4", "42")
    assert (meta["base_model"], meta["image_encoder"]) == ("tiny", "tiny:image_encoder")
    assert meta["framework_version"]


@pytest.mark.parametrize("adapter_type", ["ip_adapter", "ip_adapter_plus"])
def test_export_load_export_is_byte_identical(tiny_model_dir, tiny_base, tmp_path, adapter_type):
    from instantstyle.models import load_base

    unet = tiny_base.unet
    adapter = _trained_adapter(unet, "style_layout", adapter_type)
    first = export_safetensors(adapter, unet, tmp_path / "first.safetensors", base_model="tiny", step=7)
    fresh = load_base(tiny_model_dir).unet
    loaded = load_adapter(first, fresh)
    assert loaded.spec.blocks == BLOCKS["style_layout"]
    second = export_safetensors(loaded, fresh, tmp_path / "second.safetensors", step=7)
    a, meta_a = read_adapter_file(first)
    b, meta_b = read_adapter_file(second)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)
    assert meta_a == meta_b


def test_half_precision_export(tiny_base, tmp_path):
    adapter = _trained_adapter(tiny_base.unet, "style", "ip_adapter")
    path = export_safetensors(adapter, tiny_base.unet, tmp_path / "a.safetensors", dtype="fp16")
    with safe_open(str(path), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}


def test_shape_mismatch_names_first_bad_key(tiny_base, tmp_path):
    adapter = _trained_adapter(tiny_base.unet, "all", "ip_adapter")
    path = export_safetensors(adapter, tiny_base.unet, tmp_path / "a.safetensors")
    tensors, meta = read_adapter_file(path)
    tensors["ip_adapter.21.to_k_ip.weight"] = torch.zeros(64, 48)  # as if from a wider text encoder
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    from instantstyle.models import load_base

    with pytest.raises(AdapterFileError, match=r"ip_adapter\.21\.to_k_ip\.weight has shape \(64, 48\)"):
        load_adapter(bad, load_base(tiny_base.path).unet)


def test_public_bin_checkpoint_is_imported(tiny_base, tmp_path):
    """Legacy nested .bin (image_proj / ip_adapter groups) initialises a style adapter."""
    from instantstyle.models import load_base

    adapter = _trained_adapter(tiny_base.unet, "all", "ip_adapter")
    tensors, _ = read_adapter_file(export_safetensors(adapter, tiny_base.unet, tmp_path / "a.safetensors"))
    nested = {g: {k.removeprefix(g + "."): v for k, v in tensors.items() if k.startswith(g + ".")}
              for g in ("image_proj", "ip_adapter")}
    torch.save(nested, tmp_path / "ip-adapter_sdxl.bin")
    loaded = load_adapter(tmp_path / "ip-adapter_sdxl.bin", load_base(tiny_base.path).unet,
                          blocks=["up_blocks.0.attentions.1"])
    assert loaded.layer_names == [n for n in adapter.layer_names if n.startswith("up_blocks.0.attentions.1.")]
    for name, proc in zip(loaded.layer_names, loaded.layers):
        src = adapter.layers[adapter.layer_names.index(name)]
        assert torch.equal(proc.to_v_ip.weight, src.to_v_ip.weight)


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_pickle_payload_in_bin_is_never_executed(tiny_base, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"image_proj": {"x": _Exploit(str(marker))}, "ip_adapter": {}}, tmp_path / "evil.bin")
    with pytest.raises(Exception):
        load_adapter(tmp_path / "evil.bin", tiny_base.unet)
    assert not marker.exists()


def test_missing_file_is_a_one_line_error(tiny_base, tmp_path):
    with pytest.raises(AdapterFileError, match="not found"):
        load_adapter(tmp_path / "nope.safetensors", tiny_base.unet)


def test_file_for_another_layer_count_is_rejected(tiny_base, tmp_path):
    """Ids are positions over all layers: a file keyed for another UNet layout must not load shifted."""
    from instantstyle.models import load_base

    adapter = _trained_adapter(tiny_base.unet, "style", "ip_adapter")
    tensors, meta = read_adapter_file(export_safetensors(adapter, tiny_base.unet, tmp_path / "a.safetensors"))
    short = {k: v for k, v in tensors.items() if not k.startswith("ip_adapter.43.")}  # drop the last layer
    save_file(short, str(tmp_path / "short.safetensors"), metadata=meta)
    with pytest.raises(AdapterFileError, match="has 21 cross-attention layers, the base model has 22"):
        load_adapter(tmp_path / "short.safetensors", load_base(tiny_base.path).unet)
