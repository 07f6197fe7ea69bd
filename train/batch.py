"""Collate: decoded examples → the batch the training task consumes, one aspect-ratio bucket per batch.

Both loaders emit the same fields (``conditioning``); image batches add uint8 pixels, cached batches
the stored encoder outputs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from data_tools.embedding_cache import TENSOR_KEYS


class BatchQueues:
    """Decoded examples waiting for a batch, one queue per bucket; a batch leaves when its queue is full."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.queues: dict[Any, list[tuple[tuple[int, int], dict]]] = {}

    def add(self, position: tuple[int, int], example: dict) -> list[dict] | None:
        """Queue an example; returns a full batch (and empties its queue) when this one completes it."""
        queue = self.queues.setdefault(example.get("bucket"), [])
        queue.append((position, example))
        if len(queue) < self.batch_size:
            return None
        del self.queues[example.get("bucket")]
        return [e for _, e in queue]

    def pending(self) -> list[list[int]]:
        """(epoch, offset) of every waiting example: with the read position, the stream's exact state."""
        return sorted([list(p) for queue in self.queues.values() for p, _ in queue])


def collate(examples: list[dict], cfg: Any = None) -> dict:
    """Stack image examples into a batch.

    Pixels stay uint8 (B, H, W, 3): workers hand batches over in shared memory, 4× smaller than
    float32; ``DiffusionTask.encode`` normalises them on the device (``instantstyle.encode``).
    """
    return {
        "pixel_values": stack_uint8([e["pixels"] for e in examples]),
        "clip_pixel_values": stack_uint8([e["clip_pixels"] for e in examples]),
        **conditioning(examples),
    }


def stack_uint8(arrays: list[np.ndarray]) -> torch.Tensor:
    """Stack same-shaped uint8 arrays into one tensor (in a DataLoader worker, in shared memory: see ``_batch_buffer``)."""
    out = _batch_buffer((len(arrays), *arrays[0].shape), torch.uint8)
    if out is None:
        return torch.from_numpy(np.stack(arrays))
    np.stack(arrays, out=out.numpy())
    return out


def stack_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, into shared memory in a DataLoader worker (see ``_batch_buffer``)."""
    out = _batch_buffer((len(tensors), *tensors[0].shape), tensors[0].dtype)
    return torch.stack(tensors) if out is None else torch.stack(tensors, out=out)


def _batch_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """An empty tensor in shared memory when called in a DataLoader worker, else None.

    A worker hands its batch to the main process through shared memory: a tensor already there
    crosses without the extra full-batch copy (torch's default_collate does the same).
    """
    if get_worker_info() is None:
        return None
    size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(size), 0, shape)


def collate_cached(examples: list[dict], cfg: Any = None) -> dict:
    """Stack cached examples: the encoder outputs plus the same conditioning fields as an image batch."""
    batch = {k: stack_tensors([e["tensors"][k] for e in examples]) for k in TENSOR_KEYS if k in examples[0]["tensors"]}
    return {**batch, **conditioning(examples)}


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
