"""The batch format both loaders emit (images or cached embeddings): the fields every batch carries."""

from __future__ import annotations

import torch


def conditioning(examples: list[dict]) -> dict:
    """Captions, image dropout, SDXL size/crop conditioning and sample keys of a list of decoded examples."""
    return {
        "captions": [e["caption"] for e in examples],
        "drop_image": torch.tensor([e["drop_image"] for e in examples], dtype=torch.bool),
        "original_size": torch.tensor([e["original_size"] for e in examples], dtype=torch.long),
        "crop_coords_top_left": torch.tensor([e["crop"] for e in examples], dtype=torch.long),
        "target_size": torch.tensor([[e["bucket"][1], e["bucket"][0]] for e in examples], dtype=torch.long),
        "keys": [e["key"] for e in examples],
    }
