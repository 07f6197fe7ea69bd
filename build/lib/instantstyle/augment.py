"""Reference augmentation: make the CLIP reference share style, not layout, with the diffusion target.

An adapter trained to rebuild the very image it is shown learns to copy its content; these
transforms take that shortcut away. Each is a pure function of a uint8 (H, W, 3) array and an
explicit ``numpy.random.Generator``, so a data worker's stream of draws is reproducible.

- ``random_resized_crop``: a square region drawn *independently* of the target's crop, so the
  reference and the target overlap only by chance.
- ``horizontal_flip``: mirrors with probability ``p``.
- ``patch_shuffle``: cuts an N×N grid and permutes the tiles (as StyleShot does), which destroys
  the layout while keeping every pixel, hence colour and local texture.

``augment_reference`` applies the chain configured by ``ReferenceAugment`` (all off by default, so
wiring it in changes nothing until a config turns a step on). Its input is the image the reference
is cut from: the whole decoded image when the independent crop is on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class ReferenceAugment:
    """Which reference augmentations run; the defaults leave the reference unchanged."""

    crop_scale: tuple[float, float] | None = None  # area fraction range of the independent crop; None = off
    crop_size: int = 224  # side of the cropped reference (the image encoder's input size)
    flip_prob: float = 0.0
    shuffle_grid: int = 1  # N of the N×N patch shuffle; 1 = off

    def __post_init__(self) -> None:
        if self.crop_scale is not None:
            low, high = self.crop_scale
            if not 0 < low <= high <= 1:
                raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {tuple(self.crop_scale)}")
        if self.crop_size < 1:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if self.shuffle_grid < 1:
            raise ValueError(f"shuffle_grid must be >= 1, got {self.shuffle_grid}")

    @classmethod
    def of(cls, crop: Sequence[float] | None, flip_prob: float, shuffle_grid: int, size: int) -> "ReferenceAugment | None":
        """The chain for these settings (a data config's or precompute's), or None when every step is off."""
        if crop is None and not flip_prob and shuffle_grid <= 1:
            return None
        return cls(tuple(crop) if crop else None, size, flip_prob, shuffle_grid)


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")


def draw_crop_box(height: int, width: int, scale: tuple[float, float],
                  rng: np.random.Generator) -> tuple[int, int, int]:
    """(top, left, side) of a square covering a uniform draw from ``scale`` of the image area."""
    area = rng.uniform(*scale) * height * width
    # A square cannot exceed the short side; such draws become the largest square there is.
    side = max(1, min(round(math.sqrt(area)), height, width))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    return top, left, side


def random_resized_crop(image: np.ndarray, scale: tuple[float, float], size: int,
                        rng: np.random.Generator) -> np.ndarray:
    """A random square region (area fraction in ``scale``) resized to ``size``×``size``."""
    _check_image(image)
    top, left, side = draw_crop_box(image.shape[0], image.shape[1], scale, rng)
    region = Image.fromarray(image[top:top + side, left:left + side])
    return np.asarray(region.resize((size, size), Image.BICUBIC))


def horizontal_flip(image: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    """The image mirrored left-right with probability ``p`` (one draw from ``rng`` either way)."""
    _check_image(image)
    # Drawing even when p is 0 or 1 keeps the rng stream the same whatever p is.
    return image[:, ::-1].copy() if rng.random() < p else image


def patch_shuffle(image: np.ndarray, grid: int, rng: np.random.Generator) -> np.ndarray:
    """Permute the tiles of a ``grid``×``grid`` cut (never the identity); the histogram is kept exactly.

    When a side is not divisible by ``grid``, the remainder strip (fewer than ``grid`` pixels at
    the bottom or right) stays in place so that all tiles share one shape.
    """
    _check_image(image)
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    height, width = image.shape[0] // grid, image.shape[1] // grid
    if grid == 1 or height == 0 or width == 0:
        return image
    body = image[:grid * height, :grid * width]
    # (grid, h, grid, w, 3) -> (grid*grid, h, w, 3): one row per tile, in reading order.
    tiles = body.reshape(grid, height, grid, width, 3).transpose(0, 2, 1, 3, 4).reshape(grid * grid, height, width, 3)
    order = rng.permutation(grid * grid)
    if np.array_equal(order, np.arange(grid * grid)):  # 1 in 24 draws for a 2x2 grid would keep the layout
        order = np.roll(order, 1)
    tiles = tiles[order]
    out = image.copy()
    out[:grid * height, :grid * width] = (tiles.reshape(grid, grid, height, width, 3)
                                          .transpose(0, 2, 1, 3, 4).reshape(grid * height, grid * width, 3))
    return out


def augment_reference(image: np.ndarray, cfg: ReferenceAugment, rng: np.random.Generator) -> np.ndarray:
    """Independent crop, then flip, then patch shuffle, each only when ``cfg`` turns it on."""
    _check_image(image)
    if cfg.crop_scale is not None:
        image = random_resized_crop(image, cfg.crop_scale, cfg.crop_size, rng)
    if cfg.flip_prob > 0:
        image = horizontal_flip(image, cfg.flip_prob, rng)
    if cfg.shuffle_grid > 1:
        image = patch_shuffle(image, cfg.shuffle_grid, rng)
    return image
