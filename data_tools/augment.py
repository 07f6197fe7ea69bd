"""Per-sample random choices after the crop: classifier-free-guidance drops and the reference the image encoder sees.

Both loaders (images and the embedding cache) and ``data_tools.precompute`` draw them here, from the
sample's own RNG, so a cached run sees the same drops and views as a live one. The pixel operations
of reference augmentation are the library's (``instantstyle.augment``).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from data_tools.transforms import PreparedImage
from instantstyle.augment import ReferenceAugment, augment_reference


def draw_drops(rng: np.random.Generator, cfg: Any) -> tuple[bool, bool]:
    """(drop_image, drop_text) for classifier-free guidance, IP-Adapter's exclusive bands (``cfg``: the data config)."""
    u = rng.random()
    if u < cfg.drop_image_prob:
        return True, False
    if u < cfg.drop_image_prob + cfg.drop_text_prob:
        return False, True
    if u < cfg.drop_image_prob + cfg.drop_text_prob + cfg.drop_both_prob:
        return True, True
    return False, False


def reference_augment(cfg: Any) -> ReferenceAugment | None:
    """The data config's reference augmentation, or None when it is all off."""
    crop = tuple(cfg.reference_crop) if cfg.reference_crop is not None else None
    return _augment(crop, cfg.reference_flip_prob, cfg.reference_shuffle_grid, cfg.clip_image_size)


@functools.lru_cache(maxsize=8)
def _augment(crop: Sequence[float] | None, flip_prob: float, shuffle_grid: int, size: int) -> ReferenceAugment | None:
    return ReferenceAugment.of(crop, flip_prob, shuffle_grid, size)  # once per setting, not per sample


def augmented_view(prepared: PreparedImage, augment: ReferenceAugment, rng: np.random.Generator) -> np.ndarray:
    """An augmented reference: cut from the whole image when the crop is on, else from the CLIP view."""
    source = np.asarray(prepared.decoded) if augment.crop_scale is not None else prepared.clip_pixels
    return augment_reference(source, augment, rng)


def reference_view(prepared: PreparedImage, augment: ReferenceAugment | None, rng: np.random.Generator) -> np.ndarray:
    """What the image encoder sees: the target crop's CLIP view, or an augmented view of the same image.

    Drawn after everything else, so with every augmentation off the sample stream is exactly as before.
    """
    return prepared.clip_pixels if augment is None else augmented_view(prepared, augment, rng)
