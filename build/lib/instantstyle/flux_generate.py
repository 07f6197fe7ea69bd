"""Style-block generation with a FLUX.1 base and our FLUX adapter, one scale per double block.

The minimal counterpart of ``generate.StyleGenerator`` that ``probe_blocks`` and the
evaluation need: ``generate(style_image, prompts, scale=..., blocks=..., seed=...)`` runs the
stock ``FluxPipeline`` with the adapter's image tokens as ``joint_attention_kwargs``. A
block at scale 0 computes nothing (its processor returns the plain joint attention), so
"one block at a time" is exact. Content subtraction is unavailable: FLUX's CLIP text
encoder has no projection into the image space.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import CLIPImageProcessor

from .errors import GenerationError
from .flux import FluxStyleAdapter, double_block_processor
from .flux_blocks import ALL, flux_block_index, flux_block_name
from .flux_export import load_flux_adapter
from .flux_models import load_flux_base


class FluxStyleGenerator:
    """A FluxPipeline (with an image encoder) and the FLUX adapter installed on its transformer."""

    family = "flux"

    def __init__(self, pipe, adapter: FluxStyleAdapter) -> None:
        self.pipe, self.adapter = pipe, adapter
        if pipe.feature_extractor is None:  # CLIP's standard preprocessing at the encoder's size
            size = pipe.image_encoder.config.image_size
            pipe.feature_extractor = CLIPImageProcessor(size=size, crop_size=size)

    @classmethod
    def from_pretrained(cls, base: str, adapter: str | Path, *, image_encoder: str | None = None,
                        device: str = "cpu", dtype: torch.dtype = torch.float32) -> FluxStyleGenerator:
        """Load the FLUX base (and image encoder) and install the adapter file (ours or XLabs')."""
        flux = load_flux_base(base, image_encoder=image_encoder, dtype=dtype, device=device)
        return cls(flux.pipe, load_flux_adapter(adapter, flux.pipe.transformer).to(device))

    def block_names(self) -> list[str]:
        """The double blocks the adapter has a branch on, as ``double_blocks.{i}``."""
        return [flux_block_name(i) for i in self.adapter.block_indices]

    def active_layers(self) -> list[str]:
        """Processor names of the branches whose scale is currently non-zero (read from the processors)."""
        return [double_block_processor(i) for i, proc in zip(self.adapter.block_indices, self.adapter.layers)
                if proc.scale]

    def set_scale(self, scale: float, blocks: str | Sequence[str] | None) -> None:
        """``scale`` on the named double blocks (``None``/``all``: every branch), 0 everywhere else."""
        if blocks is None or blocks == ALL or list(blocks) == [ALL]:
            chosen = self.adapter.block_indices
        else:
            chosen = [flux_block_index(b) for b in ([blocks] if isinstance(blocks, str) else blocks)]
        missing = sorted(set(chosen) - set(self.adapter.block_indices))
        if missing:
            raise GenerationError(f"the adapter has no branch on double_blocks.{missing[0]}; it has "
                                  f"{', '.join(self.block_names())}")
        self.adapter.set_scale({i: float(scale) for i in chosen})

    @torch.no_grad()
    def generate(self, style_image: Image.Image | str | Path, prompts: str | Sequence[str], *,
                 content_prompt: str | None = None, content_scale: float = 0.0, scale: float = 1.0,
                 blocks: str | Sequence[str] | None = None, seed: int = 0, steps: int = 28, guidance: float = 3.5,
                 height: int | None = None, width: int | None = None) -> list[Image.Image]:
        """One image per prompt; ``guidance`` is FLUX's distilled guidance input, not true CFG."""
        if content_scale:
            raise GenerationError("content subtraction is unavailable for FLUX: its CLIP text encoder has no "
                                  "projection into the image space; use content scale 0")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        image = style_image if isinstance(style_image, Image.Image) else Image.open(style_image).convert("RGB")
        self.set_scale(scale, blocks)
        device = self.pipe.transformer.device
        embeds = self.pipe.encode_image(image, device, 1).repeat(len(prompts), 1)
        return list(self.pipe(
            prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
            generator=torch.Generator("cpu").manual_seed(seed),
            joint_attention_kwargs=self.adapter.attention_kwargs(embeds),
        ).images)
