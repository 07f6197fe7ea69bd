"""The synthetic dataset rendered straight into memory at 64 px, with its labels.

Pretraining and measuring the toy base need tens of thousands of small images; rendering
them into one uint8 tensor avoids shards entirely and keeps every stage deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from data_tools import synthetic

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ToyData:
    """Images (N, 3, H, W) uint8, captions, and ground-truth labels of every sample."""

    images: torch.Tensor
    captions: list[str]
    shapes: torch.Tensor  # index into synthetic.SHAPES
    palettes: torch.Tensor  # index into synthetic.PALETTES
    textures: torch.Tensor  # index into synthetic.TEXTURES
    attributes: list[dict]

    def __len__(self) -> int:
        return len(self.captions)


def render_dataset(num: int, size: int = 64, seed: int = 0, desc: str = "render") -> ToyData:
    """``num`` samples of the synthetic generator (same sampling as its shards, index by index)."""
    images = torch.empty(num, 3, size, size, dtype=torch.uint8)
    captions, attrs = [], []
    for i in tqdm(range(num), desc=desc, unit="img", mininterval=2):
        rng = np.random.default_rng([seed, i])
        a = synthetic.sample_attributes(rng)
        images[i] = torch.from_numpy(np.array(synthetic.render(a, size))).permute(2, 0, 1)
        captions.append(synthetic.caption(a, rng))
        attrs.append(a)
    return ToyData(
        images=images, captions=captions, attributes=attrs,
        shapes=torch.tensor([synthetic.SHAPES.index(a["shape"]) for a in attrs]),
        palettes=torch.tensor([list(synthetic.PALETTES).index(a["palette"]) for a in attrs]),
        textures=torch.tensor([synthetic.TEXTURES.index(a["texture"]) for a in attrs]),
    )


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 → float in [-1, 1] (VAE and UNet space)."""
    return images.float() / 127.5 - 1.0


def to_clip(images: torch.Tensor) -> torch.Tensor:
    """uint8 at the encoder's size → CLIP-normalised float, as ``CLIPImageProcessor`` does at 64 px."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


REFERENCE_SEED = 30_000  # disjoint from pretraining and the card's held-out set


def references(count: int) -> list[dict]:
    """Style references with a textured, coloured object (flat ones carry little style)."""
    data = render_dataset(count * 3, 64, REFERENCE_SEED, desc="references")
    textured = [a for a in data.attributes if a["texture"] != "flat"]
    return textured[:count]


def prompt_shapes(reference: dict, count: int) -> list[str]:
    """``count`` shapes other than the reference's, rotating so every shape gets prompted."""
    others = [s for s in synthetic.SHAPES if s != reference["shape"]]
    start = synthetic.SHAPES.index(reference["shape"])
    return [others[(start + k) % len(others)] for k in range(count)]


def reference_image(attributes: dict) -> Image.Image:
    """The 64 px render of a sample's attributes (a style reference)."""
    return synthetic.render(attributes, 64)
