"""Public model configs kept in the repo, to build full-size models without downloading weights.

Building on the ``meta`` device gives exact shapes (parameter counts, FLOPs) for free;
building on a real device gives random-weight models for speed and memory benchmarks.
"""

from __future__ import annotations

import json
from importlib import resources

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig
from transformers import CLIPVisionModelWithProjection, T5Config, T5EncoderModel

NAMES = ("sdxl_unet", "sd15_unet", "sdxl_vae", "sdxl_text_encoder", "sdxl_text_encoder_2",
         "openclip_bigg_vision", "openclip_vith_vision", "flux_transformer", "flux_vae", "t5_xxl_encoder",
         "clip_vit_large_vision")


def load_reference_config(name: str) -> dict:
    """The stored config ``name`` (see NAMES), without bookkeeping keys starting with '_'."""
    if name not in NAMES:
        raise ValueError(f"unknown reference config {name!r}; valid: {', '.join(NAMES)}")
    text = resources.files("instantstyle.configs").joinpath(f"{name}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def build_unet(name: str = "sdxl_unet", device: str | torch.device = "meta") -> UNet2DConditionModel:
    """A randomly initialised (or meta) UNet with a public architecture."""
    with torch.device(device):
        return UNet2DConditionModel.from_config(load_reference_config(name))


def build_flux_transformer(name: str = "flux_transformer",
                           device: str | torch.device = "meta") -> FluxTransformer2DModel:
    """A randomly initialised (or meta) FLUX.1 transformer with a public architecture."""
    with torch.device(device):
        return FluxTransformer2DModel.from_config(load_reference_config(name))


def build_vae(name: str = "sdxl_vae", device: str | torch.device = "meta") -> AutoencoderKL:
    """A randomly initialised (or meta) VAE with a public architecture."""
    with torch.device(device):
        return AutoencoderKL.from_config(load_reference_config(name))


def build_image_encoder(name: str = "openclip_bigg_vision",
                        device: str | torch.device = "meta") -> CLIPVisionModelWithProjection:
    """A randomly initialised (or meta) CLIP vision tower with projection."""
    config = {k: v for k, v in load_reference_config(name).items() if k not in ("architectures", "model_type")}
    with torch.device(device):
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))


def build_text_encoder(name: str = "sdxl_text_encoder", device: str | torch.device = "meta"):
    """A randomly initialised (or meta) CLIP text tower (with projection for ``*_2``)."""
    raw = load_reference_config(name)
    config = CLIPTextConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    cls = CLIPTextModelWithProjection if raw["architectures"][0].endswith("Projection") else CLIPTextModel
    with torch.device(device):
        return cls(config)


def build_t5_encoder(name: str = "t5_xxl_encoder", device: str | torch.device = "meta") -> T5EncoderModel:
    """A randomly initialised (or meta) T5 encoder (FLUX.1's ``text_encoder_2``)."""
    config = {k: v for k, v in load_reference_config(name).items() if k not in ("architectures", "model_type")}
    with torch.device(device):
        return T5EncoderModel(T5Config(**config))
