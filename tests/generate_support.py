"""Helpers shared by the inference tests (no tests here): perturbed exports and a style image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from instantstyle.adapter import AdapterSpec, install_adapter
from instantstyle.export import export_safetensors
from instantstyle.models import load_base

STYLE = ("up_blocks.0.attentions.1",)
STYLE_LAYOUT = ("up_blocks.0.attentions.1", "down_blocks.2.attentions.1")


def perturbed_adapter(base_dir: str, blocks: tuple[str, ...], seed: int = 1, noise: float = 0.5):
    """A freshly loaded base with an adapter whose weights are randomly moved away from the init."""
    base = load_base(base_dir)
    torch.manual_seed(seed)
    adapter = install_adapter(base.unet, AdapterSpec(blocks=blocks, image_embed_dim=32))
    with torch.no_grad():
        for param in adapter.parameters():
            param.add_(torch.randn_like(param) * noise)
    return base, adapter


def export_perturbed(base_dir: str, blocks: tuple[str, ...], out: Path, seed: int = 1) -> Path:
    """Export a perturbed adapter so that the image branch visibly changes the output."""
    base, adapter = perturbed_adapter(base_dir, blocks, seed)
    return export_safetensors(adapter, base.unet, out, base_model=base_dir)


def style_image(path: Path, seed: int = 0) -> Path:
    """A 64 px random RGB image written as PNG."""
    pixels = (np.random.RandomState(seed).rand(64, 64, 3) * 255).astype("uint8")
    Image.fromarray(pixels).save(path)
    return path


def as_uint8(images) -> np.ndarray:
    """PIL images -> one int16 array (signed, so differences do not wrap)."""
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])
