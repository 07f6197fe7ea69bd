"""Loading a frozen FLUX.1 base: transformer, VAE, CLIP-L + T5 text encoders, image encoder, scheduler.

The base is a stock ``FluxPipeline`` (so prompt encoding and generation are diffusers' own)
plus the CLIP image encoder of the IP-Adapter, frozen, in one precision. FLUX.1-dev and the
tiny test base go through the same ``from_pretrained`` calls; only the path differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FluxPipeline
from transformers import CLIPTextModel, CLIPVisionModelWithProjection, T5EncoderModel

from .models import BaseModelError, _config_only, _load, resolve_image_encoder

# FluxPipeline's default T5 length for FLUX.1-dev (schnell takes at most 256).
MAX_SEQUENCE_LENGTH = 512


@dataclass
class FluxBase:
    """Frozen components of a FLUX.1 base (as a stock pipeline) plus its IP-Adapter image encoder."""

    pipe: FluxPipeline
    path: str
    image_encoder_path: str
    max_sequence_length: int = MAX_SEQUENCE_LENGTH
    family: str = "flux"

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def image_encoder(self) -> CLIPVisionModelWithProjection:
        return self.pipe.image_encoder

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    def frozen_modules(self) -> list[torch.nn.Module]:
        """Every pretrained network (they never train and are never checkpointed)."""
        p = self.pipe
        return [p.transformer, p.vae, p.text_encoder, p.text_encoder_2, p.image_encoder]


def load_flux_base(path: str, *, image_encoder: str | None = None, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", encoders: bool = True) -> FluxBase:
    """Load every frozen component in eval mode with ``requires_grad=False``.

    ``encoders=False`` (training from an embedding cache) loads the transformer's weights only; the
    VAE, both text encoders and the image encoder are config-only ``meta`` modules (T5-XXL alone is 9.5 GiB).
    """
    enc_path, enc_sub = resolve_image_encoder(path, image_encoder)
    load = _load if encoders else _config_only
    # The image encoder is passed in: FLUX.1-dev's folder has none, and it may live elsewhere.
    parts = {"image_encoder": load(CLIPVisionModelWithProjection, enc_path, enc_sub, dtype)}
    if not encoders:
        parts.update(vae=_config_only(AutoencoderKL, path, "vae", dtype),
                     text_encoder=_config_only(CLIPTextModel, path, "text_encoder", dtype),
                     text_encoder_2=_config_only(T5EncoderModel, path, "text_encoder_2", dtype))
    try:
        pipe = FluxPipeline.from_pretrained(path, **parts, feature_extractor=None, dtype=dtype)
    except (OSError, ValueError) as err:
        raise BaseModelError(f"cannot load a FluxPipeline from {path}: {str(err).splitlines()[0]}") from err
    base = FluxBase(pipe, str(path), f"{enc_path}:{enc_sub}" if enc_sub else enc_path)
    for module in base.frozen_modules():
        module.requires_grad_(False).eval()
        if module.device.type != "meta":
            module.to(device)
    return base


@torch.no_grad()
def encode_flux_prompts(base: FluxBase, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 sequence embeddings, CLIP pooled embedding), exactly as ``FluxPipeline.encode_prompt``."""
    prompt_embeds, pooled, _text_ids = base.pipe.encode_prompt(
        prompts, prompt_2=None, device=base.device, max_sequence_length=base.max_sequence_length)
    return prompt_embeds, pooled
