"""Train InstantStyle adapters on the toy base, in memory (tests and the claim measurement).

Batches come straight from rendered samples instead of shards, and the diffusion math is
the training code's own ``DiffusionTask``. Captions name only the content and are often
dropped, as in IP-Adapter's image-variation regime: the image branch then has to carry
everything the text does not (style, and — unless blocks are chosen well — content).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from data_tools import synthetic
from data_tools.toy_data import ToyData
from instantstyle.adapter import InstantStyleAdapter
from instantstyle.augment import ReferenceAugment, augment_reference
from instantstyle.models import BaseModel
from train.builders import build_adapter
from train.task import AdaptedUNet, DiffusionTask


def toy_batch(data: ToyData, idx: torch.Tensor, g: torch.Generator, text_drop: float,
              augment: ReferenceAugment | None = None) -> dict:
    """A training batch in the loader's format: content captions, some dropped to ""; augmented references."""
    n = len(idx)
    dropped = (torch.rand(n, generator=g) < text_drop).tolist()
    captions = ["" if d else synthetic.content_caption(data.attributes[i]) for d, i in zip(dropped, idx.tolist())]
    size = torch.tensor([[64, 64]] * n)
    pixels = data.images[idx].permute(0, 2, 3, 1).contiguous()  # uint8 (B,H,W,3); the encoder takes 64 px too
    references = pixels
    if augment is not None:
        rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=g)))
        references = torch.from_numpy(np.stack([augment_reference(img.numpy(), augment, rng) for img in pixels]))
    return {"pixel_values": pixels, "clip_pixel_values": references,
            "captions": captions, "drop_image": torch.zeros(n, dtype=torch.bool), "original_size": size,
            "crop_coords_top_left": torch.zeros(n, 2, dtype=torch.long), "target_size": size}


def train_toy_adapter(base: BaseModel, data: ToyData, blocks: Sequence[str], *, steps: int,
                      batch_size: int = 16, lr: float = 1e-3, seed: int = 0, text_drop: float = 0.5,
                      augment: ReferenceAugment | None = None, content_scale: float = 0.0,
                      progress: bool = True) -> InstantStyleAdapter:
    """Install a fresh adapter on ``blocks`` of ``base.unet`` and train it (optionally with the style recipe)."""
    torch.manual_seed(seed)
    adapter = build_adapter(base, blocks=list(blocks), type="ip_adapter",
                            num_tokens=4, resampler_dim=64)
    g = torch.Generator().manual_seed(seed)
    task = DiffusionTask(base, AdaptedUNet(base.unet, adapter), adapter_type="ip_adapter", generator=g,
                         content_scale=content_scale)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.01)
    adapter.train()
    for _ in tqdm(range(steps), desc=f"adapter {','.join(blocks) if blocks else 'all'}", disable=not progress):
        batch = toy_batch(data, torch.randint(len(data), (batch_size,), generator=g), g, text_drop, augment)
        loss, _metrics = task(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return adapter.eval().requires_grad_(False)
