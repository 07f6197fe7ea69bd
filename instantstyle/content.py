"""InstantStyle idea 1: remove the content from the image embedding in CLIP space.

``style = image_embeds - λ · text_embeds(content prompt)``, where both live in the same
projected space: SDXL pairs the OpenCLIP bigG image encoder's ``image_embeds`` with
``text_encoder_2``'s pooled, projected ``text_embeds`` (both 1280-d, not normalised).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class ContentSpaceMismatch(ValueError):
    """Image and content-text embeddings live in spaces of different sizes."""


def check_content_space(image_embed_dim: int, text_embed_dim: int) -> None:
    """Raise ``ContentSpaceMismatch`` unless the two embedding spaces have the same width."""
    if image_embed_dim != text_embed_dim:
        raise ContentSpaceMismatch(
            f"content subtraction needs image and text embeddings in one space, but the image encoder "
            f"projects to {image_embed_dim} and the content text encoder to {text_embed_dim}; use a text "
            f"encoder paired with the image encoder (SDXL: text_encoder_2 with OpenCLIP bigG)"
        )


def subtract_content(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``image_embeds - scale * text_embeds``; text may be (D,), (1, D) or match the image batch."""
    check_content_space(image_embeds.shape[-1], text_embeds.shape[-1])
    return image_embeds - scale * text_embeds.to(image_embeds.dtype)


def decouple_content(image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: float,
                     normalize: bool = False) -> torch.Tensor:
    """Content-decoupled style embedding ``image - scale * text``, optionally on unit directions.

    With ``normalize`` both embeddings are L2-normalised first and the difference is rescaled to
    each image embedding's own norm. CLIP's two towers emit vectors of different, prompt-dependent
    lengths, so a plain ``λ`` removes more or less of the caption depending on how long its vector
    happens to be; on unit vectors ``λ`` is the same fraction of the caption direction for every
    pair. Rescaling to the image norm keeps the input to the image projection at the magnitude
    the adapter was trained on.
    """
    if not normalize:
        return subtract_content(image_embeds, text_embeds, scale)
    image = image_embeds.float()
    norm = image.norm(dim=-1, keepdim=True)
    unit_text = F.normalize(text_embeds.float(), dim=-1)
    direction = F.normalize(subtract_content(F.normalize(image, dim=-1), unit_text, scale), dim=-1)
    return (direction * norm).to(image_embeds.dtype)


@torch.no_grad()
def encode_content_prompt(text_encoder, tokenizer, prompts: str | Sequence[str]) -> torch.Tensor:
    """Pooled, projected text embedding (``text_embeds``) of content prompts, shape (N, D)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(text_encoder.device)
    out = text_encoder(ids)
    return out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output


@torch.no_grad()
def encode_image(image_encoder, clip_pixel_values: torch.Tensor, adapter_type: str = "ip_adapter") -> torch.Tensor:
    """Image features the projection expects: pooled ``image_embeds`` or penultimate hidden states (plus)."""
    pixels = clip_pixel_values.to(image_encoder.device, image_encoder.dtype, non_blocking=True)
    if adapter_type == "ip_adapter_plus":
        return image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
    return image_encoder(pixels).image_embeds
