"""Validation images in a run that trains from an embedding cache (``data=cached``).

Training from the cache needs only the UNet on the device. Generating and scoring validation images
needs the rest of the base: the text encoders (validation prompts, the CLIP text score), the image
encoder (style references, the CLIP image scores) and the VAE's decoder (latents to pixels). Such a
run loads them once into host memory and moves them to the device only while it validates, so the
training steps have the device memory of a run without them (SDXL: ~5.5 GB in bf16 kept on the host).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from instantstyle.models import BaseModel

HOST = torch.device("cpu")


def validation_encoders(base: BaseModel) -> list[torch.nn.Module]:
    """What generation and scoring need besides the UNet; the VAE's encoder is dropped (nothing encodes pixels)."""
    return [m for m in (base.vae, base.text_encoder, base.text_encoder_2, base.image_encoder) if m is not None]


def park_encoders(base: BaseModel) -> None:
    """Host memory for the encoders of a cached run; the VAE keeps only what decoding uses."""
    base.vae.encoder = None  # decode() reads post_quant_conv and the decoder only
    for module in validation_encoders(base):
        module.to(HOST)


@contextmanager
def encoders_on(base: BaseModel, device: torch.device) -> Iterator[None]:
    """Inside the block the validation encoders are on ``device``; after it, back in host memory."""
    modules = validation_encoders(base)
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module in modules:
            module.to(HOST)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give their blocks back to the training steps' allocator pool
