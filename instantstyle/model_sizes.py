"""Parameter counts and weight bytes of a base and its adapter, from configs on the ``meta`` device.

``meta_base("sdxl" | "sd15" | "flux" | DIR)`` builds every network of a base with its exact shapes
and no weights: the public configs in ``instantstyle/configs`` for the named bases, a diffusers
folder's own configs otherwise. ``install_meta_adapter`` puts on it the adapter the trainer would
train. Nothing is downloaded and nothing is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapter import AdapterSpec, install_adapter
from .blocks import UnknownBlockError, resolve_blocks
from .flux import FluxAdapterSpec, install_flux_adapter
from .flux_blocks import flux_block_indices, resolve_flux_blocks
from .reference_configs import (build_flux_transformer, build_image_encoder, build_t5_encoder, build_text_encoder,
                                build_unet, build_vae)

NAMED_BASES = ("sdxl", "sd15", "flux")
# Bytes per trainable parameter: fp32 weight + fp32 grad + optimizer states.
BYTES_PER_PARAM = {"adamw": 4 + 4 + 8, "adamw8bit": 4 + 4 + 2}
# Bytes per weight of a quantized nn.Linear (instantstyle.quantize): int8 and fp8 store one byte plus a
# per-row scale (negligible); NF4 half a byte plus an int8 scale per block of 64 (double quantization).
QUANTIZED_BYTES = {"int8": 1.0, "fp8": 1.0, "nf4": 0.5 + 1 / 64}
# FLUX block choices of bench_params: one double block, every double block, and every block. The last is
# hypothetical: diffusers' FLUX IP-Adapter format has branches on double blocks only.
FLUX_CHOICES = ("one_double", "all_double", "all_blocks")


@dataclass
class MetaBase:
    """A base's networks on the meta device, and the shapes of the inputs its denoiser takes."""

    family: str                      # sdxl | sd15 | flux
    denoiser: nn.Module              # the UNet, or FLUX's transformer
    encoders: dict[str, nn.Module]   # vae, text encoder(s), image encoder: frozen, not in the adapter's path
    image_embed_dim: int             # the image encoder's projected width (what ip_adapter projects)
    text_tokens: int                 # prompt sequence length the denoiser attends to
    label: str


def meta_base(base: str, *, image_encoder: str | None = None) -> MetaBase:
    """The named public base (sdxl, sd15, flux) or a diffusers folder, built on ``meta``."""
    if base in NAMED_BASES:
        built = _reference_base(base)
    elif Path(base).is_dir():
        built = _folder_base(base, image_encoder)
    else:
        raise ValueError(f"--base {base}: not a folder and not one of {', '.join(NAMED_BASES)}")
    for module in (built.denoiser, *built.encoders.values()):
        module.requires_grad_(False)  # frozen, as in training: weight_bytes counts exactly these
    return built


def _reference_base(name: str) -> MetaBase:
    if name == "flux":
        encoders = {"text_encoder_2 (T5)": build_t5_encoder(), "text_encoder (CLIP)": build_text_encoder(),
                    "image_encoder": build_image_encoder("clip_vit_large_vision"), "vae": build_vae("flux_vae")}
        return MetaBase("flux", build_flux_transformer(), encoders, 768, 512, "FLUX.1-dev (public configs)")
    encoders = {"text_encoder": build_text_encoder(), "vae": build_vae()}
    if name == "sdxl":
        encoders["text_encoder_2"] = build_text_encoder("sdxl_text_encoder_2")
        encoders["image_encoder"] = build_image_encoder("openclip_bigg_vision")
        return MetaBase("sdxl", build_unet("sdxl_unet"), encoders, 1280, 77, "SDXL 1.0 (public configs)")
    encoders["image_encoder"] = build_image_encoder("openclip_vith_vision")
    return MetaBase("sd15", build_unet("sd15_unet"), encoders, 1024, 77, "SD 1.5 (public configs)")


def _folder_base(path: str, image_encoder: str | None) -> MetaBase:
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection
    from transformers import T5EncoderModel

    from .flux_models import MAX_SEQUENCE_LENGTH
    from .models import _config_only, model_family, resolve_image_encoder

    enc_path, enc_sub = resolve_image_encoder(path, image_encoder)
    image = _config_only(CLIPVisionModelWithProjection, enc_path, enc_sub, torch.float32)
    encoders = {"text_encoder": _config_only(CLIPTextModel, path, "text_encoder", torch.float32),
                "vae": _config_only(AutoencoderKL, path, "vae", torch.float32), "image_encoder": image}
    embed_dim = image.config.projection_dim
    if Path(path, "transformer").is_dir():
        encoders["text_encoder_2 (T5)"] = _config_only(T5EncoderModel, path, "text_encoder_2", torch.float32)
        transformer = _config_only(FluxTransformer2DModel, path, "transformer", torch.float32)
        return MetaBase("flux", transformer, encoders, embed_dim, MAX_SEQUENCE_LENGTH, path)
    unet = _config_only(UNet2DConditionModel, path, "unet", torch.float32)
    family = model_family(unet)
    if family == "sdxl":
        encoders["text_encoder_2"] = _config_only(CLIPTextModelWithProjection, path, "text_encoder_2", torch.float32)
    return MetaBase(family, unet, encoders, embed_dim, 77, path)


def install_meta_adapter(base: MetaBase, blocks: str, *, num_tokens: int = 4) -> nn.Module:
    """The ``ip_adapter`` the trainer would install for ``blocks`` (a preset, ``all``, or comma-separated names)."""
    if base.family == "flux":
        names = resolve_flux_blocks([b.strip() for b in blocks.split(",")])
        indices = flux_block_indices(names)
        return install_flux_adapter(base.denoiser, FluxAdapterSpec(indices, base.image_embed_dim, num_tokens))
    chosen = resolve_blocks(blocks, base.family)
    if not chosen:
        raise UnknownBlockError(f"no blocks in {blocks!r}")
    spec = AdapterSpec("ip_adapter", tuple(chosen), base.image_embed_dim, num_tokens)
    return install_adapter(base.denoiser, spec)


def parameter_count(module: nn.Module, *, trainable: bool | None = None) -> int:
    """Number of parameters (all, or only those with the given ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def weight_bytes(module: nn.Module, dtype_bytes: float, quantize: str = "none") -> float:
    """Bytes of ``module``'s frozen weights; with ``quantize``, each linear weight ``model.quantize`` quantizes
    at its quantized size."""
    from .quantize import quantizable_linears

    per_linear = QUANTIZED_BYTES.get(quantize, dtype_bytes)
    linear = {id(layer.weight) for _, layer in quantizable_linears(module)}
    return sum(p.numel() * (per_linear if id(p) in linear else dtype_bytes)
               for p in module.parameters() if not p.requires_grad)


def count_trainable(model: str, preset: str, adapter_type: str) -> dict[str, int]:
    """Parameter counts of the projection and of the image branches for one SDXL / SD 1.5 preset."""
    base = meta_base(model)
    encoder = base.encoders["image_encoder"].config
    plus = adapter_type == "ip_adapter_plus"
    spec = AdapterSpec(adapter_type, tuple(resolve_blocks(preset, model)),
                       encoder.hidden_size if plus else encoder.projection_dim, 16 if plus else 4)
    adapter = install_adapter(base.denoiser, spec)
    projection = parameter_count(adapter.image_proj)
    branches = parameter_count(adapter.layers)
    return {"layers": len(adapter.layer_names), "projection": projection, "branches": branches,
            "total": projection + branches}


def count_flux_trainable(choice: str) -> dict[str, int]:
    """Parameter counts of a FLUX.1-dev IP-Adapter (CLIP ViT-L/14 embeddings, 4 tokens) per block choice."""
    transformer = build_flux_transformer()
    config = transformer.config
    adapter = install_flux_adapter(transformer, FluxAdapterSpec(double_blocks=None))
    per_block = parameter_count(adapter.layers[0])
    # Single-stream blocks have the same width, so a branch there would cost the same.
    layers = {"one_double": 1, "all_double": config.num_layers,
              "all_blocks": config.num_layers + config.num_single_layers}[choice]
    projection = parameter_count(adapter.image_proj)
    return {"layers": layers, "projection": projection, "branches": layers * per_block,
            "total": projection + layers * per_block}


def flux_frozen_bytes(dtype_bytes: int = 2) -> int:
    """Size of the frozen FLUX.1-dev transformer's weights (bf16 by default)."""
    return parameter_count(build_flux_transformer()) * dtype_bytes
