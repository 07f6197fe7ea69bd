"""model=flux through ``train(cfg)`` on the tiny FLUX base: what trains, exact resume, export, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from PIL import Image
from safetensors.torch import load_file
from test_flux import run as run_transformer
from test_flux import transformer_inputs

from instantstyle.flux import FluxStyleBlockProcessor
from instantstyle.flux_export import read_flux_file
from instantstyle.flux_models import encode_flux_prompts, load_flux_base
from instantstyle.model_ids import portable_id
from train.config import ConfigError, compose
from train.checks import check_config
from train.export import main as export_main
from train.flux_task import FluxTask, clip_pixels, vae_pixels
from train.loop import StopSignal
from train.training import train
from instantstyle.encode import clip_input, vae_input
from tests.helpers import tiny_overrides

RESUME_ARGS = ("trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.lr_scheduler=cosine",
               "trainer.warmup_steps=1", "trainer.ema=0.9", "trainer.record_sample_keys=true", "optim.lr=1e-3",
               "data.drop_image_prob=0.3", "data.drop_text_prob=0.3", "blocks.targets=[double_blocks.1]")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    from data_tools.make_tiny_flux import save_tiny_flux

    return str(save_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "base", seed=0))


def flux_overrides(flux_dir: str, shards: str, out, *extra: str) -> list[str]:
    """A CPU-sized FLUX run: the tiny FLUX base with its own image encoder, 64 px (8x8 latents)."""
    return tiny_overrides(flux_dir, shards, out, "model=flux", "model.image_encoder=null", *extra)


@pytest.fixture(scope="module")
def uninterrupted(flux_dir, shards, tmp_path_factory):
    """Four FLUX steps in one go (the reference for resume and export)."""
    out = tmp_path_factory.mktemp("flux_run")
    return out, train(compose(flux_overrides(flux_dir, shards, out, *RESUME_ARGS)))


def test_only_the_chosen_branch_and_projection_train_and_the_base_stays_bitwise(uninterrupted, flux_dir):
    out, run = uninterrupted
    kinds = {name: type(p) for name, p in run.base.transformer.attn_processors.items()}
    assert kinds.pop("transformer_blocks.1.attn.processor") is FluxStyleBlockProcessor
    assert set(kinds.values()) == {FluxAttnProcessor}
    names = {n for n, _ in run.adapter.named_parameters()}
    assert names == {f"image_proj.{m}.{w}" for m in ("proj", "norm") for w in ("weight", "bias")} | {
        f"layers.0.to_{p}_ip.{w}" for p in "kv" for w in ("weight", "bias")}
    optimized = [p for group in run.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in run.adapter.parameters()}
    # Every adapter tensor got gradients (AdamW moments non-zero): it really trains.
    assert all(run.optimizer.state[p]["exp_avg"].abs().sum() > 0 for p in optimized)
    fresh, adapter_ids = load_flux_base(flux_dir), {id(p) for p in optimized}
    for trained, pristine in zip(run.base.frozen_modules(), fresh.frozen_modules()):
        # The branch lives inside the transformer (its block's processor); everything else is frozen.
        frozen = [p for p in trained.parameters() if id(p) not in adapter_ids]
        assert all(not p.requires_grad and p.grad is None for p in frozen)
        after, before = trained.state_dict(), pristine.state_dict()
        assert {k for k in after if k not in before} <= {k for k in after if ".processor.to_" in k}
        for key, value in before.items():
            assert torch.equal(after[key], value), key
    assert run.summary["step"] == 4 and (out / "ip-adapter.safetensors").is_file()


def test_flux_resume_after_preemption_is_bitwise_identical(uninterrupted, flux_dir, shards, tmp_path, monkeypatch):
    ref_dir, ref = uninterrupted
    out = tmp_path / "resumed"
    cfg = compose(flux_overrides(flux_dir, shards, out, *RESUME_ARGS))
    calls = []
    monkeypatch.setattr(StopSignal, "agreed", lambda self, acc: calls.append(1) or len(calls) == 2)
    first = train(cfg)  # "preempted" after step 2: checkpoint, no export
    assert first.summary["preempted"] and first.step == 2 and not (out / "ip-adapter.safetensors").exists()
    monkeypatch.undo()
    second = train(cfg)  # resume=auto
    assert second.summary["resumed_from"].endswith("checkpoint-00000002") and second.step == 4
    for key, value in ref.adapter.state_dict().items():
        assert torch.equal(value, second.adapter.state_dict()[key]), key
    for name in ("adapter", "optimizer", "ema"):
        ref_state = load_file(str(ref_dir / f"checkpoints/checkpoint-00000004/{name}.safetensors"))
        new_state = load_file(str(out / f"checkpoints/checkpoint-00000004/{name}.safetensors"))
        assert ref_state.keys() == new_state.keys() and all(torch.equal(ref_state[k], new_state[k]) for k in ref_state)
    ref_file, _ = read_flux_file(ref_dir / "ip-adapter.safetensors")
    new_file, _ = read_flux_file(out / "ip-adapter.safetensors")
    assert all(torch.equal(ref_file[k], new_file[k]) for k in ref_file)
    assert (out / "sample_keys/rank0.txt").read_text() == (ref_dir / "sample_keys/rank0.txt").read_text()


def test_training_export_loads_in_stock_flux_pipeline_and_matches_our_adapter(uninterrupted, flux_dir):
    out, run = uninterrupted
    tensors, meta = read_flux_file(out / "ip-adapter.safetensors")
    assert json.loads(meta["double_blocks"]) == [1] and meta["step"] == "4"
    assert meta["base_model"] == portable_id(flux_dir) and flux_dir not in meta["base_model"]  # no local path
    stock = FluxPipeline.from_pretrained(flux_dir)
    stock.load_ip_adapter(str(out), weight_name="ip-adapter.safetensors")
    embeds = stock.encode_image(Image.new("RGB", (64, 64), (200, 40, 90)), "cpu", 1).repeat(2, 1)
    inputs = transformer_inputs(stock.transformer)
    base = run_transformer(stock.transformer, inputs, ip_adapter_image_embeds=[embeds[:, None] * 0])
    theirs = run_transformer(stock.transformer, inputs, ip_adapter_image_embeds=[embeds[:, None]])
    ours = run_transformer(run.base.transformer, inputs, **run.adapter.attention_kwargs(embeds))  # EMA weights
    assert (theirs - base).abs().max() > 1e-5  # the trained branch matters, so agreeing is not vacuous
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_export_cli_on_a_flux_checkpoint_matches_the_training_export(uninterrupted, tmp_path, capsys):
    out, _run = uninterrupted
    ckpt = out / "checkpoints" / "checkpoint-00000004"
    export_main([str(ckpt), "--out", str(tmp_path / "ema.safetensors"), "--ema"])
    final, _ = read_flux_file(out / "ip-adapter.safetensors")  # trained with EMA: the EMA weights
    ema, meta = read_flux_file(tmp_path / "ema.safetensors")
    assert final.keys() == ema.keys() and all(torch.equal(final[k], ema[k]) for k in final)
    assert meta["step"] == "4" and json.loads(meta["double_blocks"]) == [1]
    export_main([str(ckpt), "--out", str(tmp_path / "raw.safetensors"), "--dtype", "bf16"])
    raw, _ = read_flux_file(tmp_path / "raw.safetensors")
    weights = load_file(str(ckpt / "adapter.safetensors"))
    assert torch.equal(raw["double_blocks.1.processor.ip_adapter_double_stream_v_proj.weight"],
                       weights["layers.0.to_v_ip.weight"].bfloat16())
    assert not raw["double_blocks.0.processor.ip_adapter_double_stream_v_proj.weight"].any()


def test_export_cli_onto_a_non_flux_base_is_a_one_line_error(uninterrupted, tiny_model_dir, tmp_path, capsys):
    out, _run = uninterrupted
    ckpt = out / "checkpoints" / "checkpoint-00000004"
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(ckpt), "--out", str(tmp_path / "x.safetensors"), "--base", tiny_model_dir])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: cannot read the FLUX transformer config")
    assert err.count("\n") == 1 and not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("override, message", [
    ("blocks.targets=[double_blocks.3]", "unknown FLUX double block 3; valid: 0..2 (transformer_blocks)"),
    ("blocks.targets=[up_blocks.0.attentions.1]", "unknown FLUX block 'up_blocks.0.attentions.1' — valid: double_blocks.K"),
    ("blocks=style", "no FLUX style preset is measured yet: choose blocks.targets=[double_blocks.K] or blocks=all"),
    ("adapter=ip_adapter_plus", "adapter.type=ip_adapter_plus is not available for model=flux"),
    ("adapter.num_tokens=8 blocks=all", "adapter.num_tokens=8 cannot be read back by diffusers' FLUX IP-Adapter loader"),
    ("trainer.snr_gamma=5.0", "trainer.snr_gamma weights a noise-prediction loss"),
    ("trainer.content_scale=0.5", "trainer.content_scale needs a shared text-image space"),
])
def test_bad_flux_config_is_one_line_error(flux_dir, shards, tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        check_config(compose(flux_overrides(flux_dir, shards, tmp_path, *override.split())))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_unknown_block_on_a_base_built_on_first_use_is_a_one_line_error(shards, tmp_path):
    cfg = compose(flux_overrides(str(tmp_path / "new-tiny-flux"), shards, tmp_path / "run", "model.build_if_missing=true",
                                 "blocks.targets=[7]", "trainer.max_steps=1"))
    check_config(cfg)  # nothing to check against before the base exists
    with pytest.raises(ConfigError, match=r"^unknown FLUX double block 7; valid: 0\.\.2 \(transformer_blocks\)$"):
        train(cfg)


def test_blocks_all_trains_every_double_block(flux_dir, shards, tmp_path):
    run = train(compose(flux_overrides(flux_dir, shards, tmp_path, "blocks=all", "trainer.max_steps=1")))
    assert run.adapter.block_indices == [0, 1, 2]
    assert json.loads(run.identity["target_blocks"]) == ["double_blocks.0", "double_blocks.1", "double_blocks.2"]
    assert run.identity["family"] == "flux"


def test_flux_task_encodes_dropped_images_as_zeros_and_dropped_text_as_the_empty_prompt(flux_dir):
    base = load_flux_base(flux_dir)
    task = FluxTask(base, None, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    batch = {"pixel_values": torch.randint(0, 256, (2, 64, 64, 3), generator=g, dtype=torch.uint8),
             "clip_pixel_values": torch.randint(0, 256, (2, 224, 224, 3), generator=g, dtype=torch.uint8),
             "captions": ["a red circle", ""], "drop_image": torch.tensor([True, False])}
    cond = task.encode(batch)
    assert not cond.image_embeds[0].any() and cond.image_embeds[1].abs().sum() > 0
    empty, empty_pooled = encode_flux_prompts(base, [""])
    assert torch.equal(cond.prompt_embeds[1], empty[0]) and torch.equal(cond.pooled[1], empty_pooled[0])
    assert cond.latents.shape == (2, 16, 8, 8)
    # uint8 batches are normalised exactly as the UNet task does it.
    assert torch.equal(vae_pixels(batch["pixel_values"]), vae_input(batch["pixel_values"]))
    assert torch.equal(clip_pixels(batch["clip_pixel_values"], (0.5,) * 3, (0.25,) * 3),
                       clip_input(batch["clip_pixel_values"], (0.5,) * 3, (0.25,) * 3))


def test_gradient_checkpointing_trains_the_same_adapter(flux_dir, shards, tmp_path):
    args = ("blocks.targets=[double_blocks.1]", "trainer.max_steps=2", "optim.lr=1e-2")
    plain = train(compose(flux_overrides(flux_dir, shards, tmp_path / "plain", *args)))
    recomputed = train(compose(flux_overrides(flux_dir, shards, tmp_path / "ckpt", *args,
                                              "trainer.gradient_checkpointing=true")))
    assert recomputed.base.transformer.gradient_checkpointing
    for key, value in plain.adapter.state_dict().items():
        torch.testing.assert_close(recomputed.adapter.state_dict()[key], value, atol=1e-6, rtol=0)
    assert plain.adapter.layers[0].to_v_ip.weight.abs().sum() > 0  # it trained


def test_init_from_an_all_block_file_takes_its_projection_and_only_the_chosen_branch(flux_dir, tmp_path):
    from test_flux import trained_adapter

    from instantstyle.flux_export import export_flux_safetensors
    from train.flux_builders import build_flux_adapter

    source = load_flux_base(flux_dir)
    path = export_flux_safetensors(trained_adapter(source.transformer, blocks=(0, 1, 2)), source.transformer,
                                   tmp_path / "all.safetensors")
    tensors, _ = read_flux_file(path)
    adapter = build_flux_adapter(load_flux_base(flux_dir), blocks=["double_blocks.1"], num_tokens=4, init_from=str(path))
    assert adapter.block_indices == [1]
    assert torch.equal(adapter.image_proj.proj.weight, tensors["ip_adapter_proj_model.proj.weight"])
    assert torch.equal(adapter.layers[0].to_k_ip.weight,
                       tensors["double_blocks.1.processor.ip_adapter_double_stream_k_proj.weight"])
    with pytest.raises(ConfigError, match=r"^adapter.init_from=.*: adapter file not found"):
        build_flux_adapter(load_flux_base(flux_dir), blocks=["double_blocks.1"], num_tokens=4,
                           init_from=str(tmp_path / "missing.safetensors"))
