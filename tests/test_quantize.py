"""model.quantize: a quantized frozen base (torchao) under an fp32 adapter; tiny FLUX and SDXL bases."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from data_tools.make_tiny_flux import build_tiny_flux_transformer
from instantstyle.adapter import AdapterSpec, install_adapter
from instantstyle.flux import FluxAdapterSpec, install_flux_adapter
from instantstyle.flux_export import read_flux_file
from instantstyle.flux_flow import noisy_pair, pack_latents, transformer_inputs
from instantstyle.model_sizes import QUANTIZED_BYTES
from instantstyle.quantize import is_quantized, quantizable_linears, quantize_frozen, storage_bytes
from train.config import ConfigError, check_sections, compose
from train.flux_builders import build_flux_base
from train.loop import StopSignal
from train.training import train
from tests.helpers import tiny_overrides

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="model.quantize needs the [quantize] extra (torchao)")
METHODS = ("int8", "fp8", "nf4")
RESUME_ARGS = ("trainer.max_steps=4", "trainer.checkpoint_every=2", "optim.lr=1e-3", "blocks.targets=[double_blocks.1]")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    from data_tools.make_tiny_flux import save_tiny_flux

    return str(save_tiny_flux(tmp_path_factory.mktemp("quant_flux") / "base", seed=0))


def tiny_unet(folder: str) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet").requires_grad_(False)


@needs_torchao
@pytest.mark.parametrize("method", METHODS)
def test_frozen_linear_weights_shrink_by_the_quantized_factor(method, tiny_model_dir):
    for model in (build_tiny_flux_transformer().requires_grad_(False), tiny_unet(tiny_model_dir)):
        layers = [layer for _, layer in quantizable_linears(model)]
        others = {n: p.clone() for n, p in model.named_parameters() if not any(p is l.weight for l in layers)}
        before = sum(storage_bytes(layer.weight) for layer in layers)
        assert quantize_frozen(model, method) == len(layers) > 0
        ratio = sum(storage_bytes(layer.weight) for layer in layers) / before
        expected = QUANTIZED_BYTES[method] / 4  # from fp32; the rest is per-row scales of 32-wide tiny layers
        assert expected <= ratio <= 1.15 * expected, (method, ratio)
        assert all(torch.equal(p, others[n]) for n, p in model.named_parameters() if n in others)
    unet = tiny_unet(tiny_model_dir)
    quantize_frozen(unet, method)
    attn2 = unet.up_blocks[0].attentions[1].transformer_blocks[0].attn2
    assert not is_quantized(attn2.to_k) and not is_quantized(attn2.to_v) and is_quantized(attn2.to_q)


def flow_loss(transformer, adapter, latents, prompt, pooled, embeds) -> torch.Tensor:
    """FluxTask.flow_loss's math on bare modules, with the same noise at every call."""
    noisy, target, sigmas = noisy_pair(latents, generator=torch.Generator().manual_seed(1))
    inputs = transformer_inputs(transformer, noisy, sigmas, prompt, pooled, 3.5)
    prediction = transformer(**inputs, joint_attention_kwargs=adapter.attention_kwargs(embeds)).sample
    return F.mse_loss(prediction.float(), pack_latents(target).float())


def flux_losses(method: str, steps: int) -> list[float]:
    torch.manual_seed(0)
    transformer = build_tiny_flux_transformer().requires_grad_(False)
    quantize_frozen(transformer, method)
    adapter = install_flux_adapter(transformer, FluxAdapterSpec((1,), image_embed_dim=32))
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=3e-3)
    latents, prompt, pooled = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 48), torch.randn(2, 32)
    embeds, losses = torch.randn(2, 32), []
    for _ in range(steps):  # the same noise every step: the loss can only fall by fitting the adapter
        loss = flow_loss(transformer, adapter, latents, prompt, pooled, embeds)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 and not is_quantized(adapter) for p in adapter.parameters())
    return losses


def unet_losses(folder: str, method: str, steps: int) -> list[float]:
    torch.manual_seed(0)
    unet = tiny_unet(folder)
    quantize_frozen(unet, method)
    adapter = install_adapter(unet, AdapterSpec("ip_adapter", ("up_blocks.0.attentions.1",), 32, 4))
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=3e-3)
    config = unet.config
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    prompt, embeds = torch.randn(2, 77, config.cross_attention_dim), torch.randn(2, 32)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled), "time_ids": torch.randn(2, 6)}
    losses = []
    for _ in range(steps):
        prediction = unet(latents + noise, torch.tensor([500, 500]),
                          encoder_hidden_states=(prompt, adapter.image_tokens(embeds)), added_cond_kwargs=added).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@needs_torchao
@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_adapter_trains_through_quantized_frozen_layers(method, tiny_model_dir):
    runs = {"flux": (flux_losses(method, 30), flux_losses("none", 30)),
            "sdxl": (unet_losses(tiny_model_dir, method, 30), unet_losses(tiny_model_dir, "none", 30))}
    for family, (quantized, reference) in runs.items():
        # Gradients reach the branches through the quantized layers: the loss falls about as far as without.
        assert quantized[0] - quantized[-1] > 0.8 * (reference[0] - reference[-1]) > 0, (family, quantized)


def quantized_run(flux_dir, shards, out, *extra):
    return compose(tiny_overrides(flux_dir, shards, out, "model=flux", "model.image_encoder=null",
                                  "model.quantize=nf4", *RESUME_ARGS, *extra))


@needs_torchao
def test_quantized_flux_run_resumes_bitwise_saves_fp32_and_exports_for_stock_diffusers(
        flux_dir, shards, tmp_path, monkeypatch):
    ref = train(quantized_run(flux_dir, shards, tmp_path / "ref"))
    assert is_quantized(ref.base.transformer) and is_quantized(ref.base.pipe.text_encoder_2)
    out = tmp_path / "resumed"
    calls = []
    monkeypatch.setattr(StopSignal, "agreed", lambda self, acc: calls.append(1) or len(calls) == 2)
    assert train(quantized_run(flux_dir, shards, out)).step == 2  # "preempted" after step 2
    monkeypatch.undo()
    resumed = train(quantized_run(flux_dir, shards, out))
    assert resumed.summary["resumed_from"].endswith("checkpoint-00000002") and resumed.step == 4
    for key, value in ref.adapter.state_dict().items():
        assert torch.equal(value, resumed.adapter.state_dict()[key]), key
    saved = load_file(str(out / "checkpoints/checkpoint-00000004/adapter.safetensors"))
    assert saved.keys() == ref.adapter.state_dict().keys()
    assert all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in saved.values())
    exported, _ = read_flux_file(out / "ip-adapter.safetensors")
    assert all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in exported.values())
    stock = FluxPipeline.from_pretrained(flux_dir)  # unquantized, as users load it
    stock.load_ip_adapter(str(out), weight_name="ip-adapter.safetensors")
    loaded = stock.transformer.transformer_blocks[1].attn.processor.to_k_ip[0].weight
    assert torch.equal(loaded, resumed.adapter.layers[0].to_k_ip.weight)


def test_a_quantization_this_machine_cannot_run_is_refused_in_one_line(flux_dir, monkeypatch):
    with pytest.raises(ConfigError, match=r"^model.quantize='int4' — valid: none, int8, fp8, nf4$"):
        check_sections(compose(["data.shards=x", "model.quantize=int4"]))
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # not installed
    with pytest.raises(ConfigError) as err:
        build_flux_base(flux_dir, quantize="nf4")
    assert str(err.value).startswith("model.quantize=nf4 needs torchao: pip install") and "\n" not in str(err.value)
    monkeypatch.undo()
    if importlib.util.find_spec("torchao") is None:
        return
    import instantstyle.quantize as quantize

    def no_kernel(module, method):
        raise NotImplementedError("no fp8 kernel for this CPU\nsecond line")
    monkeypatch.setattr(quantize, "quantize_frozen", no_kernel)
    with pytest.raises(ConfigError) as err:
        build_flux_base(flux_dir, quantize="fp8")
    assert str(err.value) == ("model.quantize=fp8 does not run on cpu in torch.float32 here (no fp8 kernel for this "
                              "CPU); choose another method or none")


@needs_torchao
def test_fsdp_with_a_quantized_base_is_refused_in_one_line():
    from types import SimpleNamespace

    from train.sharding import shard_frozen_base

    transformer = build_tiny_flux_transformer().requires_grad_(False)
    quantize_frozen(transformer, "int8")
    adapter = install_flux_adapter(transformer, FluxAdapterSpec((1,), image_embed_dim=32))
    with pytest.raises(ConfigError, match=r"^model.quantize cannot be combined with FSDP yet: use ACCELERATE_CONFIG=ddp"):
        shard_frozen_base(SimpleNamespace(family="flux", transformer=transformer), adapter, torch.device("cpu"),
                          torch.autocast)


@needs_torchao
def test_quantized_sdxl_run_resumes_bitwise_and_exports_for_stock_diffusers(tiny_model_dir, shards, tmp_path,
                                                                             monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from instantstyle.adapter import attention_module
    from instantstyle.blocks import cross_attention_layers

    def config(out):
        return compose(tiny_overrides(tiny_model_dir, shards, out, "model.quantize=int8", "trainer.max_steps=4",
                                      "trainer.checkpoint_every=2", "optim.lr=1e-3"))

    ref = train(config(tmp_path / "ref"))
    assert is_quantized(ref.base.unet)
    out, calls = tmp_path / "resumed", []
    monkeypatch.setattr(StopSignal, "agreed", lambda self, acc: calls.append(1) or len(calls) == 2)
    assert train(config(out)).step == 2
    monkeypatch.undo()
    resumed = train(config(out))
    assert resumed.step == 4 and all(torch.equal(v, resumed.adapter.state_dict()[k])
                                     for k, v in ref.adapter.state_dict().items())
    exported = load_file(str(out / "ip-adapter.safetensors"))
    assert all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in exported.values())
    pristine = tiny_unet(tiny_model_dir)
    for i, name in enumerate(cross_attention_layers(pristine.attn_processors)):
        if name not in resumed.adapter.layer_names:  # untrained: the unquantized base's text key, as stock expects
            assert torch.equal(exported[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"],
                               attention_module(pristine, name).to_k.weight)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir)
    pipe.load_ip_adapter(str(out), subfolder="", weight_name="ip-adapter.safetensors")


@needs_torchao
def test_from_the_embedding_cache_only_the_transformer_is_loaded_and_quantized(flux_dir):
    base = build_flux_base(flux_dir, quantize="int8", encoders=False)
    assert is_quantized(base.transformer)
    assert base.pipe.text_encoder_2.device.type == "meta"  # config only: nothing to quantize
