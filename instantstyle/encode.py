"""Frozen-encoder inputs and outputs shared by training (live) and the embedding cache (precomputed).

Pixels travel from the data loader as uint8 (B, H, W, 3): a quarter of float32's shared memory
between worker processes. They become float only here, on the device that runs the encoders.
"""

from __future__ import annotations

from typing import Sequence

import torch


def vae_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B,H,W,3) → float32 (B,3,H,W) in [-1, 1], the VAE's input range."""
    # Contiguous NCHW, the layout the VAE is written for (a bare permute is channels-last).
    return pixels.permute(0, 3, 1, 2).contiguous().float().div_(127.5).sub_(1.0)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device`` without making the host wait for the copy (pinned first when it goes to CUDA)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()  # a copy from pageable memory holds the host until it is done
    return tensor.to(device, non_blocking=True)


def clip_input(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B,H,W,3) → float32 (B,3,H,W) normalised with the image encoder's mean/std."""
    # The constants go to the device as one small asynchronous copy each step, never a blocking one.
    stats = to_device(torch.tensor([list(mean), list(std)], dtype=torch.float32), pixels.device).view(2, 1, 3, 1, 1)
    return pixels.permute(0, 3, 1, 2).contiguous().float().div_(255.0).sub_(stats[0]).div_(stats[1])


@torch.no_grad()
def latent_distribution(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the VAE's latent distribution for uint8 (B,H,W,3) pixels, unscaled."""
    dist = vae.encode(vae_input(to_device(pixels, vae.device)).to(vae.dtype)).latent_dist
    # The encoder's attention leaves its output channels-last; the UNet would then run channels-last
    # and round differently from latents read back (contiguous) from the cache.
    return dist.mean.contiguous(), dist.std.contiguous()


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, scaling_factor: float) -> torch.Tensor:
    """One scaled latent draw mean + std·ε, as ``DiagonalGaussianDistribution.sample`` (live and cached alike)."""
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise) * scaling_factor


def pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """``tensor`` with its last row repeated up to ``rows`` rows.

    The encoders' result for a row depends (by float rounding) on the batch size, never on the
    other rows: encoding every chunk at one fixed size makes cached values equal live ones bitwise.
    """
    missing = rows - tensor.shape[0]
    return tensor if missing <= 0 else torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])])
