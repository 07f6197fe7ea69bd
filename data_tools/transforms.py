"""SDXL image transforms: choose the size (an aspect-ratio bucket), resize to cover it, crop, flip, cut the CLIP view.

The bookkeeping follows SDXL micro-conditioning: `original_size` is the image's (height, width)
before any resize, `crop_coords_top_left` is (top, left) of the crop inside the image resized to
just cover the target (width, height), and `target_size` is the crop's (height, width). A square
target of side `resolution` is the bucket-free case. The training loader and the embedding
cache (`data_tools.precompute`) share these functions, so both crop every image alike. PIL decodes;
torch's antialiased uint8 kernel resizes (`resize`), within one level of PIL's own filters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from data_tools.decode import decode_rgb, upright_size


@dataclass
class PreparedImage:
    """A cropped training image (uint8 HWC), its CLIP view, and SDXL conditioning values."""

    pixels: np.ndarray
    clip_pixels: np.ndarray
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    decoded: Image.Image | None = None  # the whole decoded image, kept when an independent reference is cut from it


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height (in log ratio; the first on a tie)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def target_size(width: int, height: int, resolution: int, buckets: Sequence[tuple[int, int]] | None) -> tuple[int, int]:
    """(width, height) an image of this upright size trains at: its bucket, or the square ``resolution``."""
    return (resolution, resolution) if buckets is None else nearest_bucket(width, height, buckets)


def cover_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """(width, height) of the smallest aspect-preserving resize covering target_w × target_h (torchvision's rounding)."""
    if width * target_h <= height * target_w:  # relatively taller than the target: width decides
        return target_w, int(target_w * height / width)
    return int(target_h * width / height), target_h


def crop_origin(width: int, height: int, crop_w: int, crop_h: int, rng: np.random.Generator | None) -> tuple[int, int]:
    """(top, left) of a crop_w × crop_h crop in a width × height image: centred, or random when given an rng."""
    if rng is None:
        return int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))


def crop_top_left(width: int, height: int, resolution: int, rng: np.random.Generator | None) -> tuple[int, int]:
    """(top, left) of a resolution² crop (see `crop_origin`)."""
    return crop_origin(width, height, resolution, resolution, rng)


def prepare_image(image: Image.Image, size: int | tuple[int, int], clip_size: int, *, random_crop: bool = False,
                  random_flip: bool = False, rng: np.random.Generator | None = None,
                  keep_decoded: bool = False) -> PreparedImage:
    """Decode (at reduced JPEG scale when possible), resize to cover `size` (side or (w, h)), crop, maybe flip; CLIP view."""
    target_w, target_h = (size, size) if isinstance(size, int) else size
    width, height = upright_size(image)
    if image.format == "JPEG":
        # DCT-domain downscale: decodes up to 8× faster and still covers the target (asked in stored orientation).
        image.draft("RGB", (target_w, target_h) if image.size == (width, height) else (target_h, target_w))
    image = decode_rgb(image)
    new_w, new_h = cover_size(width, height, target_w, target_h)
    top, left = crop_origin(new_w, new_h, target_w, target_h, rng if random_crop else None)
    crop = resize(np.array(image), new_w, new_h, "bilinear")[top:top + target_h, left:left + target_w]
    if random_flip and rng is not None and rng.random() < 0.5:
        crop = crop[:, ::-1]
        # After mirroring, what was cut on the right is what is now cut on the left.
        left = new_w - left - target_w
    crop = np.ascontiguousarray(crop)
    return PreparedImage(crop, clip_view(crop, clip_size), (height, width), (top, left), image if keep_decoded else None)


def resize(pixels: np.ndarray, width: int, height: int, mode: str) -> np.ndarray:
    """Antialiased resize of uint8 HWC pixels (an unchanged size is returned as it is).

    torch's uint8 kernel, the one torchvision's ``Resize`` runs on tensors: within one level of PIL's
    filter of the same name, and several times faster on x86, whose AVX2 path reads and writes
    channels-last uint8, the (1, 3, H, W) view of HWC pixels. ``F.interpolate`` would return planar
    pixels; writing into an HWC buffer spares the transposing copy back.
    """
    if pixels.shape[:2] == (height, width):
        return pixels
    out = np.empty((height, width, 3), np.uint8)
    _AA_RESIZE[mode](_nchw(np.ascontiguousarray(pixels)), [height, width], False, None, None, out=_nchw(out))
    return out


_AA_RESIZE = {"bilinear": torch.ops.aten._upsample_bilinear2d_aa.out, "bicubic": torch.ops.aten._upsample_bicubic2d_aa.out}


def _nchw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)


def original_size(meta: dict, decoded: tuple[int, int]) -> tuple[int, int]:
    """(height, width) SDXL conditions on: the source size from the metadata, else the decoded size."""
    # Shards made with --max-side were downscaled; SDXL should see the true source size.
    height, width = meta.get("original_height"), meta.get("original_width")
    if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
        return height, width
    return decoded


def clip_view(crop: np.ndarray, clip_size: int) -> np.ndarray:
    """The image encoder's input: the crop's centred square (all of a square crop), resized bicubic."""
    height, width = crop.shape[:2]
    side = min(height, width)
    # A non-square bucket is cut, as CLIPImageProcessor does, never squashed.
    top, left = (height - side) // 2, (width - side) // 2
    return resize(crop[top:top + side, left:left + side], clip_size, clip_size, "bicubic")
