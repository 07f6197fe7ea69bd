"""The rectified-flow math of FLUX.1 style-adapter training; the loop only calls ``task(batch)``.

Same interface as ``train.task.DiffusionTask``. Per batch: VAE latents (normalized with the
VAE's shift and scale), T5 + CLIP-pooled prompt embeddings (a dropped caption is the empty
prompt, as the loader marks it), CLIP image embeddings (zeroed where the loader set
``drop_image``: the unconditional image branch for CFG), then σ ~ logit-normal, x_t, and the
MSE between the transformer's velocity and ε - x0 (``instantstyle.flux_flow``). Guidance-
distilled bases (FLUX.1-dev) get the constant guidance input 3.5. The SDXL size
conditioning in the batch is ignored: FLUX has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from instantstyle.encode import clip_input, sample_latents, to_device, vae_input
from instantstyle.content import encode_image
from instantstyle.flux import FluxStyleAdapter
from instantstyle.flux_flow import FluxTimestepSampling, noisy_pair, normalize_latents, pack_latents, transformer_inputs
from instantstyle.flux_models import FluxBase, encode_flux_prompts
from train.config import CLIP_MEAN, CLIP_STD

GUIDANCE_SCALE = 3.5  # FluxPipeline's and diffusers' FLUX training scripts' default


class AdaptedFluxTransformer(nn.Module):
    """Transformer + adapter as one module, so DDP sees the adapter weights used inside the forward."""

    def __init__(self, transformer: nn.Module, adapter: FluxStyleAdapter) -> None:
        super().__init__()
        self.transformer = transformer
        self.adapter = adapter

    def forward(self, inputs: dict, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.transformer(**inputs, joint_attention_kwargs=self.adapter.attention_kwargs(image_embeds)).sample


def vae_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """The loader's uint8 (B,H,W,3) pixels as the VAE's float input in [-1, 1] (float batches pass through)."""
    return vae_input(pixels) if pixels.dtype == torch.uint8 else pixels


def clip_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The loader's uint8 CLIP view as the image encoder's normalised input (float batches pass through)."""
    return clip_input(pixels, mean, std) if pixels.dtype == torch.uint8 else pixels


@dataclass
class FluxConditioning:
    """Everything the frozen encoders produce for one batch."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    image_embeds: torch.Tensor


class FluxTask:
    """Rectified-flow loss of the adapted FLUX transformer; ``task(batch) -> (loss, metrics)``."""

    def __init__(self, base: FluxBase, model: nn.Module, *, generator: torch.Generator,
                 sampling: FluxTimestepSampling = FluxTimestepSampling(), guidance_scale: float = GUIDANCE_SCALE,
                 clip_mean: Sequence[float] = CLIP_MEAN, clip_std: Sequence[float] = CLIP_STD) -> None:
        self.base, self.model, self.generator = base, model, generator
        self.sampling, self.guidance_scale = sampling, guidance_scale
        self.clip_mean, self.clip_std = tuple(clip_mean), tuple(clip_std)
        self.device = base.device

    def using(self, generator: torch.Generator, model: nn.Module | None = None) -> "FluxTask":
        """The same task with another noise generator (and model): fixed-noise evaluation losses."""
        return FluxTask(self.base, model or self.model, generator=generator, sampling=self.sampling,
                        guidance_scale=self.guidance_scale, clip_mean=self.clip_mean, clip_std=self.clip_std)

    @torch.no_grad()
    def encode(self, batch: dict) -> FluxConditioning:
        """Normalized latents, prompt embeddings and image embeddings; nothing here needs grad.

        A batch from an embedding cache (``data=cached``) carries the encoders' outputs; any other
        carries uint8 pixels and captions, encoded here. Both then draw the latent from its
        distribution with the task's generator, so the two give the same loss.
        """
        mean, std, prompt_embeds, pooled, embeds = self._cached(batch) if "latent_mean" in batch else self._live(batch)
        vae = self.base.vae
        draw = sample_latents(mean, std, self.generator, 1.0)  # what latent_dist.sample(generator) draws
        latents = normalize_latents(draw, vae.config.shift_factor, vae.config.scaling_factor)
        keep = (~to_device(batch["drop_image"], self.device)).to(embeds.dtype)
        return FluxConditioning(latents.float(), prompt_embeds, pooled, embeds * keep[:, None])

    def _live(self, batch: dict) -> tuple:
        """Run the frozen encoders on the loader's pixels and captions."""
        vae = self.base.vae
        dist = vae.encode(vae_pixels(batch["pixel_values"].to(self.device)).to(vae.dtype)).latent_dist
        prompt_embeds, pooled = encode_flux_prompts(self.base, list(batch["captions"]))
        clip = clip_pixels(batch["clip_pixel_values"].to(self.device), self.clip_mean, self.clip_std)
        return dist.mean, dist.std, prompt_embeds, pooled, encode_image(self.base.image_encoder, clip, "ip_adapter")

    def _cached(self, batch: dict) -> tuple:
        """The precomputed outputs, in the dtypes the (unloaded) encoders would have produced."""
        pipe = self.base.pipe

        def moved(key: str, dtype: torch.dtype) -> torch.Tensor:
            return to_device(batch[key], self.device).to(dtype)

        return (moved("latent_mean", pipe.vae.dtype), moved("latent_std", pipe.vae.dtype),
                moved("prompt_embeds", pipe.text_encoder_2.dtype),  # T5
                moved("pooled_prompt_embeds", pipe.text_encoder.dtype),  # CLIP-L
                moved("image_features", pipe.image_encoder.dtype))

    def __call__(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.flow_loss(self.encode(batch))

    def flow_loss(self, cond: FluxConditioning) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """σ and ε drawn from the task's generator, then the MSE of the predicted velocity against ε - x0."""
        noisy, target, sigmas = noisy_pair(cond.latents, sampling=self.sampling, generator=self.generator)
        inputs = transformer_inputs(self.base.transformer, noisy, sigmas, cond.prompt_embeds, cond.pooled,
                                    self.guidance_scale)
        prediction = self.model(inputs, cond.image_embeds)
        loss = F.mse_loss(prediction.float(), pack_latents(target).float())
        return loss, {"loss": loss.detach()}
