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
from instantstyle.content import decouple_content, encode_image
from instantstyle.diffusion import prediction_target
from instantstyle.encode import clip_input, latent_distribution, sample_latents, to_device
from instantstyle.models import BaseModel, encode_prompts
from train.config import CLIP_MEAN, CLIP_STD


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
                 noise_offset: float = 0.0, snr_gamma: float | None = None, content_scale: float = 0.0,
                 content_normalize: bool = False, clip_mean: tuple[float, ...] = CLIP_MEAN,
                 clip_std: tuple[float, ...] = CLIP_STD) -> None:
        self.base, self.model, self.adapter_type = base, model, adapter_type
        self.generator, self.noise_offset, self.snr_gamma = generator, noise_offset, snr_gamma
        self.content_scale, self.content_normalize = content_scale, content_normalize
        self.clip_mean, self.clip_std = tuple(clip_mean), tuple(clip_std)
        self.scheduler = base.noise_scheduler
        self.device = base.unet.device

    def using(self, generator: torch.Generator, model: nn.Module | None = None) -> "DiffusionTask":
        """The same task with another noise generator (and model): fixed-noise evaluation losses."""
        return DiffusionTask(self.base, model or self.model, adapter_type=self.adapter_type, generator=generator,
                             noise_offset=self.noise_offset, snr_gamma=self.snr_gamma,
                             content_scale=self.content_scale, content_normalize=self.content_normalize,
                             clip_mean=self.clip_mean, clip_std=self.clip_std)

    @torch.no_grad()
    def encode(self, batch: dict) -> Conditioning:
        """Latents, text embeddings, image features and SDXL time ids; nothing here needs grad.

        A batch from an embedding cache (``data=cached``) carries the encoders' outputs; any other
        carries uint8 pixels and captions, encoded here. Both then share every step below.
        """
        mean, std, prompt_embeds, pooled, features = (self._cached(batch) if "latent_mean" in batch
                                                       else self._live(batch))
        latents = sample_latents(mean, std, self.generator, self.base.vae.config.scaling_factor)
        features = self.decouple(features, pooled, batch["captions"])
        keep = (~to_device(batch["drop_image"], self.device)).to(features.dtype)
        features = features * keep.view(-1, *([1] * (features.ndim - 1)))  # unconditional image branch for CFG
        added = None
        if self.base.family == "sdxl":
            time_ids = torch.cat([batch["original_size"], batch["crop_coords_top_left"], batch["target_size"]], dim=1)
            time_ids = to_device(time_ids, self.device).to(prompt_embeds.dtype)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        return Conditioning(latents.float(), prompt_embeds, features, added)

    def decouple(self, features: torch.Tensor, pooled: torch.Tensor | None, captions: list[str]) -> torch.Tensor:
        """InstantStyle's content subtraction at training time: image embedding − λ · its caption's embedding.

        The caption's pooled, projected text embedding (SDXL ``text_encoder_2``) is what the UNet's added
        conditioning already uses, so this costs nothing. Samples whose caption was dropped are left as
        they are. Only the pooled ``ip_adapter`` input lives in the text space; Plus reads hidden states.
        """
        if not self.content_scale or pooled is None or self.adapter_type != "ip_adapter":
            return features
        has_text = to_device(torch.tensor([bool(c) for c in captions], dtype=features.dtype), features.device)
        return decouple_content(features, pooled.to(features.dtype) * has_text[:, None], self.content_scale,
                                self.content_normalize)

    def _live(self, batch: dict) -> tuple:
        """Run the frozen encoders on uint8 pixels (normalised here, on the device) and captions."""
        # The loader pins its batches on CUDA: the copies overlap compute instead of holding the host.
        mean, std = latent_distribution(self.base.vae, to_device(batch["pixel_values"], self.device))
        prompt_embeds, pooled = encode_prompts(self.base, list(batch["captions"]))
        clip_pixels = clip_input(to_device(batch["clip_pixel_values"], self.device), self.clip_mean, self.clip_std)
        return mean, std, prompt_embeds, pooled, encode_image(self.base.image_encoder, clip_pixels, self.adapter_type)

    def _cached(self, batch: dict) -> tuple:
        """The precomputed outputs, in the dtypes the (unloaded) encoders would have produced."""
        b = self.base

        def moved(key: str, dtype: torch.dtype) -> torch.Tensor | None:
            tensor = batch.get(key)  # pinned on CUDA by the loader, like the pixels: copies overlap compute
            return None if tensor is None else to_device(tensor, self.device).to(dtype)

        return (moved("latent_mean", b.vae.dtype), moved("latent_std", b.vae.dtype),
                moved("prompt_embeds", b.text_encoder.dtype), moved("pooled_prompt_embeds", b.text_encoder.dtype),
                moved("image_features", b.image_encoder.dtype))

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
