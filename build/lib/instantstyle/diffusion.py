"""Diffusion objectives shared by adapter training and the toy base's pretraining."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def prediction_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """What a UNet must predict for ``scheduler``'s ``prediction_type`` (epsilon or v_prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}: use epsilon or v_prediction")
