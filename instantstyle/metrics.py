"""CLIP-space metrics of stylised images: style similarity, text alignment, content leakage.

All three are cosines between projected CLIP embeddings (image tower vs image tower, or
image tower vs text tower of the same model). By default the base's own pair is used:
the IP-Adapter image encoder and SDXL's ``text_encoder_2``, which share one projected space
(the same pairing content subtraction relies on).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

from .content import check_content_space, encode_content_prompt

METRICS = ("style_similarity", "text_alignment", "content_leakage")
# Scored only when their models are given (instantstyle.style_metrics); reports omit them otherwise.
OPTIONAL_METRICS = ("csd_style_similarity", "dino_content_leakage")


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosines of two (N, D) tensors (``b`` may be (1, D) and is then broadcast)."""
    return F.cosine_similarity(a.float(), b.float().expand_as(a), dim=-1)


def style_similarity(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Cosine of each generated image embedding with its style reference's image embedding."""
    return paired_cosine(generated, references)


def text_alignment(generated: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Cosine of each generated image embedding with its prompt's text embedding."""
    return paired_cosine(generated, prompts)


def content_leakage(generated: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """Cosine with the reference's content caption: how much of the reference's subject came along."""
    return paired_cosine(generated, captions)


def mean_metrics(samples: Sequence[Mapping[str, float | None]]) -> dict[str, float | None]:
    """Average of each metric over the samples that have it (None when none has); optional ones if scored."""
    means: dict[str, float | None] = {}
    scored = [name for name in OPTIONAL_METRICS if any(name in s for s in samples)]
    for name in (*METRICS, *scored):
        values = [s[name] for s in samples if s.get(name) is not None]
        means[name] = sum(values) / len(values) if values else None
    return means


class ClipEmbedder:
    """Projected CLIP embeddings of images and texts from one image tower and one text tower."""

    def __init__(self, image_encoder: CLIPVisionModelWithProjection, processor: CLIPImageProcessor,
                 text_encoder: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer, batch_size: int = 16) -> None:
        check_content_space(image_encoder.config.projection_dim, text_encoder.config.projection_dim)
        self.image_encoder, self.processor = image_encoder, processor
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.batch_size = batch_size

    @classmethod
    def from_pipeline(cls, pipe) -> ClipEmbedder:
        """The base's own pair: the IP-Adapter image encoder and SDXL's text_encoder_2."""
        return cls(pipe.image_encoder, pipe.feature_extractor, pipe.text_encoder_2, pipe.tokenizer_2)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> ClipEmbedder:
        """A separate evaluator: any CLIP folder or id with both towers (e.g. openai/clip-vit-large-patch14)."""
        config = CLIPConfig.from_pretrained(path)
        # Each tower's sub-config lacks the joint projection width; without it the projection is re-initialised.
        vision, text = config.vision_config, config.text_config
        vision.projection_dim = text.projection_dim = config.projection_dim
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(path, config=vision).eval().to(device)
        text_encoder = CLIPTextModelWithProjection.from_pretrained(path, config=text).eval().to(device)
        size = image_encoder.config.image_size
        try:
            processor = CLIPImageProcessor.from_pretrained(path)
        except OSError:  # a bare model folder: CLIP's standard preprocessing at the tower's size
            processor = CLIPImageProcessor(size=size, crop_size=size)
        return cls(image_encoder, processor, text_encoder, CLIPTokenizer.from_pretrained(path))

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) projected image embeddings, float32 on CPU."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(list(images[start:start + self.batch_size]), return_tensors="pt").pixel_values
            pixels = pixels.to(self.image_encoder.device, self.image_encoder.dtype)
            chunks.append(self.image_encoder(pixels).image_embeds.float().cpu())
        return torch.cat(chunks)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) projected (pooled) text embeddings, float32 on CPU."""
        chunks = [encode_content_prompt(self.text_encoder, self.tokenizer, list(texts[i:i + self.batch_size]))
                  for i in range(0, len(texts), self.batch_size)]
        return torch.cat(chunks).float().cpu()
