"""FLUX.1's rectified-flow training objective, as plain functions a training task calls.

    x_t = (1 - σ) · x0 + σ · ε        target = ε - x0        loss = ‖v_θ(x_t, σ) - target‖²

Timestep sampling (the choice, and why): σ = sigmoid(n), n ~ N(logit_mean, logit_std²)
("logit-normal", SD3 paper §3.1), the default ``weighting_scheme`` of diffusers' FLUX
training scripts (``train_dreambooth_flux.py``, ``..._lora_flux.py``) with their defaults
0 and 1. Those scripts snap σ to the scheduler's 1000 training steps; here σ stays
continuous, which has the same distribution up to that rounding (1/1000). The optional
``shift="resolution"`` also maps σ through FLUX's resolution-dependent shift
σ' = e^μ / (e^μ + 1/σ - 1), μ linear in the number of image tokens (256 → 0.5,
4096 → 1.15), the same map FluxPipeline applies to its sampling schedule: it spends more
training steps at high noise for large images. The loss is unweighted (the scripts'
weighting is 1 for logit-normal).

Guidance-distilled bases (FLUX.1-dev, ``guidance_embeds=True``) take a guidance value as
an input; training feeds a constant (default 3.5, the scripts' and FluxPipeline's default).
The transformer gets σ itself as ``timestep`` (it multiplies by 1000 internally).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import FluxTransformer2DModel


@dataclass(frozen=True)
class FluxTimestepSampling:
    """How training draws σ; defaults follow diffusers' FLUX training scripts."""

    weighting: str = "logit_normal"  # "logit_normal" or "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: str = "none"  # "none" or "resolution" (FLUX.1-dev's dynamic shift)
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15


def resolution_shift_mu(image_seq_len: int, sampling: FluxTimestepSampling = FluxTimestepSampling()) -> float:
    """μ of FLUX's dynamic shift: linear in the packed image sequence length."""
    slope = (sampling.max_shift - sampling.base_shift) / (sampling.max_seq_len - sampling.base_seq_len)
    return sampling.base_shift + slope * (image_seq_len - sampling.base_seq_len)


def shift_sigmas(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """σ' = e^μ / (e^μ + 1/σ - 1): pushes σ towards 1 (more noise) for μ > 0."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def sample_sigmas(batch: int, *, image_seq_len: int, sampling: FluxTimestepSampling = FluxTimestepSampling(),
                  generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """One σ in (0, 1) per sample."""
    if sampling.weighting == "logit_normal":
        normal = torch.randn(batch, generator=generator, device=device)
        sigmas = torch.sigmoid(sampling.logit_mean + sampling.logit_std * normal)
    elif sampling.weighting == "uniform":
        sigmas = torch.rand(batch, generator=generator, device=device)
    else:
        raise ValueError(f"unknown timestep weighting {sampling.weighting!r}; valid: logit_normal, uniform")
    if sampling.shift == "resolution":
        return shift_sigmas(sigmas, resolution_shift_mu(image_seq_len, sampling))
    if sampling.shift != "none":
        raise ValueError(f"unknown timestep shift {sampling.shift!r}; valid: none, resolution")
    return sigmas


def flow_matching_pair(latents: torch.Tensor, noise: torch.Tensor,
                       sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) = ((1 - σ) x0 + σ ε, ε - x0), σ broadcast over all but the batch dimension."""
    sigmas = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
    return (1 - sigmas) * latents + sigmas * noise, noise - latents


def guidance_input(transformer: FluxTransformer2DModel, batch: int, scale: float = 3.5,
                   device: str | torch.device = "cpu") -> torch.Tensor | None:
    """The guidance value per sample for guidance-distilled bases, None for the others."""
    if not transformer.config.guidance_embeds:
        return None
    return torch.full((batch,), float(scale), device=device, dtype=torch.float32)


def normalize_latents(latents: torch.Tensor, shift_factor: float, scaling_factor: float) -> torch.Tensor:
    """VAE latents -> the transformer's latent space, as FluxPipeline inverts before decoding."""
    return (latents - shift_factor) * scaling_factor


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 · W/2, 4C): FLUX's 2x2 patch tokens, in FluxPipeline's order."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def latent_image_ids(height: int, width: int, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RoPE positions (0, row, column) of the packed tokens of an (H, W) latent."""
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, device=device).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).to(dtype)


def noisy_pair(latents: torch.Tensor, *, sampling: FluxTimestepSampling = FluxTimestepSampling(),
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, target, σ) for normalized latents: σ first, then the noise, both from ``generator``."""
    b, _, h, w = latents.shape
    sigmas = sample_sigmas(b, image_seq_len=(h // 2) * (w // 2), sampling=sampling, generator=generator,
                           device=latents.device)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    noisy, target = flow_matching_pair(latents, noise, sigmas)
    return noisy, target, sigmas


def transformer_inputs(transformer: FluxTransformer2DModel, noisy: torch.Tensor, sigmas: torch.Tensor,
                       prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor,
                       guidance_scale: float = 3.5) -> dict[str, torch.Tensor | None]:
    """Keyword arguments of ``FluxTransformer2DModel.forward`` for (B, C, H, W) noisy latents, as FluxPipeline builds them."""
    b, _, h, w = noisy.shape
    device, dtype = noisy.device, transformer.dtype
    return {
        "hidden_states": pack_latents(noisy).to(dtype), "timestep": sigmas.to(dtype),
        "guidance": guidance_input(transformer, b, guidance_scale, device),
        "pooled_projections": pooled_prompt_embeds.to(dtype), "encoder_hidden_states": prompt_embeds.to(dtype),
        "txt_ids": torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
        "img_ids": latent_image_ids(h, w, device, dtype),
    }

