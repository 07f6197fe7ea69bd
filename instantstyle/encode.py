"""Frozen-encoder inputs and outputs shared by training (live) and the embedding cache (precomputed).

Pixels travel from the data loader as uint8 (B, H, W, 3): a quarter of float32's shared memory
between worker processes. They become float only here, on the device that runs the encoders.
"""

from __future__ import annotations

from typing import Sequence

import torch


def vae_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B,H,W,3) → float32 (B,3,H,W) in [-1, 1], the VAE's input range."""
    return pixels.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def clip_input(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B,H,W,3) → float32 (B,3,H,W) normalised with the image encoder's mean/std."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    return pixels.permute(0, 3, 1, 2).float().div_(255.0).sub_(mean_t).div_(std_t)
