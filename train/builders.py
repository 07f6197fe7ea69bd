"""Builders of the ``model`` and ``adapter`` config groups (their ``_target_``s)."""

from __future__ import annotations

from pathlib import Path

import torch

from instantstyle.adapter import AdapterSpec, InstantStyleAdapter, install_adapter
from instantstyle.export import load_adapter
from instantstyle.models import BaseModel, load_base


def build_base(path: str, *, image_encoder: str | None = None, check_content_space: bool = True,
               build_if_missing: bool = False, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> BaseModel:
    """Load the frozen base (the ``model`` group's builder); the tiny base is made on first use."""
    if build_if_missing and not Path(path, "unet").is_dir():
        from data_tools.make_tiny_model import save_tiny_model

        save_tiny_model(path)
    return load_base(path, image_encoder=image_encoder, dtype=dtype, device=device,
                     check_content=check_content_space)


def adapter_spec(base: BaseModel, *, type: str, num_tokens: int, resampler_dim: int,
                 blocks: list[str] | None) -> AdapterSpec:
    """What to train on this base: image feature width comes from the image encoder."""
    enc = base.image_encoder.config
    embed_dim = enc.hidden_size if type == "ip_adapter_plus" else enc.projection_dim
    extra = {"base_model": base.path, "image_encoder": base.image_encoder_path}
    return AdapterSpec(type, tuple(blocks), embed_dim, num_tokens,
                       resampler_dim, extra)


def build_adapter(base: BaseModel, *, blocks: list[str] | None, type: str, num_tokens: int,
                  resampler_dim: int, init_from: str | None = None) -> InstantStyleAdapter:
    """Install a fresh adapter (or one initialised from a file) on the base UNet (the ``adapter`` group)."""
    if base.family == "flux":  # FLUX: image branches on double-stream blocks (train/flux_builders.py)
        from train.flux_builders import build_flux_adapter

        return build_flux_adapter(base, blocks=blocks, num_tokens=num_tokens, init_from=init_from)
    spec = adapter_spec(base, type=type, num_tokens=num_tokens, resampler_dim=resampler_dim, blocks=blocks)
    if init_from:
        adapter = load_adapter(init_from, base.unet, blocks=blocks)
        adapter.spec = spec
    else:
        adapter = install_adapter(base.unet, spec)
    return adapter.to(base.unet.device, torch.float32)
