"""The diffusion math of adapter training: encode, noise, predict, loss. The loop only calls ``task(batch)``.

Frozen networks run under ``no_grad`` in the configured precision and keep no activations;
the adapter's weights stay float32. Autograd reaches only what the adapter needs: layers
before the first target block have no inputs that require grad, so they are not differentiated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from torch import nn

from instantstyle.adapter import InstantStyleAdapter
from instantstyle.content import encode_image
from instantstyle.diffusion import prediction_target
from instantstyle.models import BaseModel, encode_prompts


class AdaptedUNet(nn.Module):
    """UNet + adapter as one module, so DDP/FSDP see the adapter weights used inside the UNet forward."""

    def __init__(self, unet: nn.Module, adapter: InstantStyleAdapter) -> None:
        super().__init__()
        self.unet = unet
        self.adapter = adapter

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor,
                image_features: torch.Tensor, added_cond_kwargs: dict | None) -> torch.Tensor:
        tokens = self.adapter.image_tokens(image_features)
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=(prompt_embeds, tokens),
                         added_cond_kwargs=added_cond_kwargs).sample


def rank_seed(seed: int, rank: int) -> int:
    """Data-parallel ranks need distinct noise streams that are still fixed by ``seed``."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


@dataclass
class Conditioning:
    """Everything the frozen encoders produce for one batch."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    image_features: torch.Tensor
    added_cond_kwargs: dict | None


class DiffusionTask:
    """Noise-prediction loss of the adapted UNet; ``task(batch) -> (loss, metrics)``."""

    def __init__(self, base: BaseModel, model: nn.Module, *, adapter_type: str, generator: torch.Generator,
                 noise_offset: float = 0.0, snr_gamma: float | None = None) -> None:
        self.base, self.model, self.adapter_type = base, model, adapter_type
        self.generator, self.noise_offset, self.snr_gamma = generator, noise_offset, snr_gamma
        self.scheduler = base.noise_scheduler
        self.device = base.unet.device

    @torch.no_grad()
    def encode(self, batch: dict) -> Conditioning:
        """Latents, text embeddings, image features and SDXL time ids; nothing here needs grad."""
        vae = self.base.vae
        # non_blocking: the loader pins its batches on CUDA, so copies overlap compute instead of syncing.
        pixels = batch["pixel_values"].to(self.device, vae.dtype, non_blocking=True)
        latents = vae.encode(pixels).latent_dist.sample(generator=self.generator) * vae.config.scaling_factor
        prompt_embeds, pooled = encode_prompts(self.base, list(batch["captions"]))
        features = encode_image(self.base.image_encoder, batch["clip_pixel_values"].to(self.device, non_blocking=True),
                                self.adapter_type)
        keep = (~batch["drop_image"].to(self.device, non_blocking=True)).to(features.dtype)
        features = features * keep.view(-1, *([1] * (features.ndim - 1)))  # unconditional image branch for CFG
        added = None
        if self.base.family == "sdxl":
            time_ids = torch.cat([batch["original_size"], batch["crop_coords_top_left"], batch["target_size"]], dim=1)
            time_ids = time_ids.to(self.device, prompt_embeds.dtype, non_blocking=True)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        return Conditioning(latents.float(), prompt_embeds, features, added)

    def add_noise(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noise, timesteps, noisy latents), drawn from this rank's generator."""
        b, c = latents.shape[:2]
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((b, c, 1, 1), generator=self.generator, device=self.device)
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (b,), generator=self.generator, device=self.device)
        return noise, timesteps, self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet must predict under the scheduler's parameterisation."""
        return prediction_target(self.scheduler, latents, noise, timesteps)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """MSE, optionally min-SNR-γ weighted per sample (Hang et al. 2023)."""
        if self.snr_gamma is None:
            return F.mse_loss(pred, target)
        snr = compute_snr(self.scheduler, timesteps)
        weight = torch.clamp(snr, max=self.snr_gamma) / snr
        if self.scheduler.config.prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=self.snr_gamma) / (snr + 1)
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * weight).mean()

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        cond = self.encode(batch)
        noise, timesteps, noisy = self.add_noise(cond.latents)
        pred = self.model(noisy, timesteps, cond.prompt_embeds, cond.image_features, cond.added_cond_kwargs)
        loss = self.loss(pred.float(), self.target(cond.latents, noise, timesteps).float(), timesteps)
        return loss, {"loss": loss.detach()}
