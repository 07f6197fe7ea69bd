"""Training on the tiny base: only the style-block adapter changes, the task's math, overfitting one batch."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from instantstyle.export import read_adapter_file
from instantstyle.models import load_base
from train.config import compose
from train.builders import build_adapter, build_base
from train.task import DiffusionTask
from train.training import train
from tests.helpers import tiny_overrides

STYLE = "up_blocks.0.attentions.1"


def test_training_changes_only_style_adapter_weights(tiny_model_dir, shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "sekret-key-123")  # must never reach any file of the run
    cfg = compose(tiny_overrides(tiny_model_dir, shards, tmp_path / "run", "trainer.max_steps=3",
                                 "trainer.checkpoint_every=0", "optim.lr=1e-3", "logger=tensorboard",
                                 "trainer.validate_every=2"))
    run = train(cfg)
    fresh = load_base(tiny_model_dir)
    trained_unet = run.base.unet.state_dict()
    adapter_keys = {k for k in trained_unet if ".processor." in k}
    # Exactly the style block's to_k_ip/to_v_ip live in the UNet; everything else is bitwise the pretrained base.
    assert adapter_keys and all(k.startswith(STYLE) and k.endswith(("to_k_ip.weight", "to_v_ip.weight"))
                                for k in adapter_keys)
    assert len(adapter_keys) == 2 * len(run.adapter.layers) == 4
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder"):
        before = getattr(fresh, name).state_dict()
        after = {k: v for k, v in getattr(run.base, name).state_dict().items() if k not in adapter_keys}
        assert before.keys() == after.keys(), name
        assert all(torch.equal(before[k], after[k]) for k in before), f"{name} changed"
    # The trained weights moved away from their initialisation (to_k/to_v copies, seeded projection).
    for layer, proc in zip(run.adapter.layer_names, run.adapter.layers):
        attn = fresh.unet.get_submodule(layer.removesuffix(".processor"))
        assert not torch.equal(proc.to_k_ip.weight, attn.to_k.weight)
        assert not torch.equal(proc.to_v_ip.weight, attn.to_v.weight)
    torch.manual_seed(cfg.trainer.seed)
    init = build_adapter(load_base(tiny_model_dir), blocks=[STYLE], type="ip_adapter", num_tokens=4, resampler_dim=1280)
    assert not torch.equal(init.image_proj.proj.weight, run.adapter.image_proj.proj.weight)
    # Outputs: export with metadata, resolved config, summary with the numbers of this run.
    tensors, meta = read_adapter_file(tmp_path / "run" / "ip-adapter.safetensors")
    assert json.loads(meta["target_blocks"]) == [STYLE] and meta["step"] == "3"
    assert torch.equal(tensors["image_proj.proj.weight"], run.adapter.image_proj.proj.weight)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["step"] == 3 and summary["samples_seen"] == 6 and summary["final_loss"] > 0
    assert "model:\n  _target_: train.builders.build_base" in (tmp_path / "run" / "config.yaml").read_text()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["checkpoint-00000003"]
    assert not any(b"sekret-key-123" in p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file())

    # Metrics reach the tracker at every log step.
    events = EventAccumulator(str(next((tmp_path / "run" / "logs").glob("*")))).Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/samples_per_s", "perf/data_wait_frac",
            "val/fixed_batch_loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("val/fixed_batch_loss")] == [2]
    assert all(0 <= e.value <= 1 for e in events.Scalars("perf/data_wait_frac"))


def fixed_batch(batch_size: int = 2) -> dict:
    """A deterministic batch in the loader's format."""
    g = torch.Generator().manual_seed(1)
    return {
        "pixel_values": torch.randint(0, 256, (batch_size, 64, 64, 3), generator=g, dtype=torch.uint8),
        "clip_pixel_values": torch.randint(0, 256, (batch_size, 224, 224, 3), generator=g, dtype=torch.uint8),
        "captions": ["a red circle", ""][:batch_size],
        "drop_image": torch.tensor([False, True][:batch_size]),
        "original_size": torch.tensor([[480, 640], [64, 64]][:batch_size]),
        "crop_coords_top_left": torch.tensor([[3, 5], [0, 0]][:batch_size]),
        "target_size": torch.tensor([[64, 64], [64, 64]][:batch_size]),
        "keys": ["a", "b"][:batch_size],
    }


@pytest.fixture()
def task(tiny_model_dir):
    from train.task import AdaptedUNet

    base = build_base(tiny_model_dir)
    torch.manual_seed(0)
    adapter = build_adapter(base, blocks=[STYLE], type="ip_adapter", num_tokens=4, resampler_dim=1280)
    return DiffusionTask(base, AdaptedUNet(base.unet, adapter), adapter_type="ip_adapter",
                         generator=torch.Generator().manual_seed(0)), adapter


def test_encode_builds_sdxl_time_ids_and_drops_image(task):
    task, _ = task
    cond = task.encode(fixed_batch())
    assert cond.added_cond_kwargs["time_ids"].tolist() == [[480, 640, 3, 5, 64, 64], [64, 64, 0, 0, 64, 64]]
    assert cond.image_features[0].abs().sum() > 0 and torch.count_nonzero(cond.image_features[1]) == 0
    assert cond.latents.shape == (2, 4, 8, 8) and cond.prompt_embeds.shape == (2, 77, 64)


def test_min_snr_weighting_matches_definition(task):
    task, _ = task
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([10, 500, 990])
    task.snr_gamma = None
    plain = task.loss(pred, target, timesteps)
    task.snr_gamma = 5.0
    alphas = task.scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    expected = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * torch.clamp(snr, max=5.0) / snr
    assert torch.allclose(task.loss(pred, target, timesteps), expected.mean())
    task.snr_gamma = 1e9  # γ above every SNR: plain MSE
    assert torch.allclose(task.loss(pred, target, timesteps), plain)


def test_overfits_one_batch(task):
    task, adapter = task
    batch = fixed_batch()
    batch["drop_image"][:] = False
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-2)

    def mean_loss() -> float:
        """Loss averaged over the same four (noise, timestep) draws the training repeats."""
        losses = []
        for draw in range(4):
            task.generator.manual_seed(draw)
            with torch.no_grad():
                losses.append(float(task(batch)[0]))
        return sum(losses) / len(losses)

    curve = [mean_loss()]
    for step in range(30):
        task.generator.manual_seed(step % 4)
        loss, _ = task(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 9:
            curve.append(mean_loss())
    # Only two small style layers learn on a random base, so the drop is modest (≈2.5%) but steady.
    assert all(later < earlier for earlier, later in zip(curve, curve[1:])), curve
    assert curve[-1] < 0.985 * curve[0], curve


def test_gradient_checkpointing_gives_the_same_gradients(task):
    task, adapter = task
    batch = fixed_batch()

    def grads() -> list[torch.Tensor]:
        task.generator.manual_seed(5)
        task(batch)[0].backward()
        out = [p.grad.clone() for p in adapter.parameters()]
        adapter.zero_grad(set_to_none=True)
        return out

    plain = grads()
    task.base.unet.enable_gradient_checkpointing()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, grads()))
    assert all(g.abs().sum() > 0 for g in plain)


def test_content_decoupled_training_feeds_the_subtracted_embedding(task):
    from instantstyle.content import encode_image
    from instantstyle.encode import clip_input

    task, _ = task
    batch = {**fixed_batch(), "drop_image": torch.tensor([False, False])}  # "a red circle", and a dropped caption
    plain = task.encode(batch).image_features
    with torch.no_grad():
        ids = task.base.tokenizer_2(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        caption = task.base.text_encoder_2(ids).text_embeds[0]
        clip = clip_input(batch["clip_pixel_values"], task.clip_mean, task.clip_std)
        image = encode_image(task.base.image_encoder, clip, "ip_adapter")
    torch.testing.assert_close(plain, image)  # λ = 0: the reference's embedding as it is
    task.content_scale = 0.5
    decoupled = task.encode(batch).image_features
    torch.testing.assert_close(decoupled[0], image[0] - 0.5 * caption)  # image − λ · caption, by hand
    torch.testing.assert_close(decoupled[1], image[1])  # no caption (dropped for CFG): nothing subtracted
    task.content_normalize = True
    unit = task.encode(batch).image_features[0]
    direction = image[0] / image[0].norm() - 0.5 * caption / caption.norm()
    torch.testing.assert_close(unit, direction / direction.norm() * image[0].norm())


def test_fine_tuning_starts_from_a_released_adapter_restricted_to_the_chosen_blocks(tiny_model_dir, tmp_path):
    from instantstyle.adapter import AdapterSpec, install_adapter
    from instantstyle.blocks import ALL_BLOCKS
    from instantstyle.export import export_safetensors
    from tests.helpers import perturb_

    released = build_base(tiny_model_dir)  # stands in for a public all-layer IP-Adapter (no block metadata needed)
    full = install_adapter(released.unet, AdapterSpec("ip_adapter", ALL_BLOCKS, 32, 4, 1280))
    perturb_(full)
    path = export_safetensors(full, released.unet, tmp_path / "released.safetensors")
    base = build_base(tiny_model_dir)
    tuned = build_adapter(base, blocks=[STYLE], type="ip_adapter", num_tokens=4, resampler_dim=1280,
                          init_from=str(path))
    assert tuned.spec.blocks == (STYLE,) and all(name.startswith(STYLE + ".") for name in tuned.layer_names)
    assert torch.equal(tuned.image_proj.proj.weight, full.image_proj.proj.weight)
    released_layers = dict(zip(full.layer_names, full.layers))
    for name, proc in zip(tuned.layer_names, tuned.layers):
        assert torch.equal(proc.to_k_ip.weight, released_layers[name].to_k_ip.weight)
        assert torch.equal(proc.to_v_ip.weight, released_layers[name].to_v_ip.weight)
    assert len(tuned.layers) < len(full.layers)  # every other layer: no image branch at all
