"""Small utilities shared by tests (inputs for the tiny UNet, weight perturbation, snapshots)."""

from __future__ import annotations

import torch


def unet_inputs(unet, batch: int = 2, seed: int = 0) -> dict:
    """Random latents, timesteps, text states and SDXL micro-conditioning for ``unet``."""
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    cond = {}
    if unet.config.get("addition_embed_type") == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        cond = {"text_embeds": torch.randn(batch, pooled, generator=g),
                "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)}
    return {
        "sample": torch.randn(batch, unet.config.in_channels, size, size, generator=g),
        "timestep": torch.tensor([10, 700][:batch] + [500] * max(0, batch - 2)),
        "text": torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g),
        "added_cond_kwargs": cond,
    }


def run_unet(unet, inputs: dict, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """UNet output with (text, image tokens) or text only."""
    states = inputs["text"] if tokens is None else (inputs["text"], tokens)
    with torch.no_grad():
        return unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=states,
                    added_cond_kwargs=inputs["added_cond_kwargs"]).sample


def perturb_(module: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Add seeded noise to every parameter, so a trained-looking adapter differs from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every tensor in a state dict."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def tiny_overrides(model_dir: str, shards: str, out, *extra: str) -> list[str]:
    """Hydra overrides for a CPU-sized training run: 64 px, batch 2, no workers."""
    return [f"model.path={model_dir}", f"data.shards={shards}/*.tar", "data.resolution=64", "data.num_workers=0",
            "data.shuffle_buffer=8", "trainer.batch_size=2", "trainer.log_every=1", f"output_dir={out}", *extra]


def assert_same_steps(live, cached, live_adapter: torch.nn.Module, cached_adapter: torch.nn.Module, pairs,
                      optimizers: tuple = ()) -> None:
    """Live and cached tasks over paired batches: same keys, captions and drops, bitwise-equal loss and gradients.

    ``optimizers`` (live, cached) also step both adapters between batches. The guidance drops must occur.
    """
    dropped_text = dropped_image = 0
    for a, b in pairs:
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"] and torch.equal(a["drop_image"], b["drop_image"])
        dropped_text += a["captions"].count("")
        dropped_image += int(a["drop_image"].sum())
        loss_a, _ = live(a)
        loss_b, _ = cached(b)
        loss_a.backward()
        loss_b.backward()
        assert torch.equal(loss_a, loss_b)
        for p, q in zip(live_adapter.parameters(), cached_adapter.parameters()):
            assert torch.equal(p.grad, q.grad)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    assert dropped_text and dropped_image  # the drops were exercised
