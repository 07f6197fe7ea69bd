"""Per-sample random choices shared by the image and the cached loaders: CFG dropout, reference augmentation."""

from __future__ import annotations

import numpy as np

from instantstyle.augment import ReferenceAugment
from train.config import DataConfig


def draw_drops(rng: np.random.Generator, cfg: DataConfig) -> tuple[bool, bool]:
    """(drop_image, drop_text) for classifier-free guidance, IP-Adapter's exclusive bands."""
    u = rng.random()
    if u < cfg.drop_image_prob:
        return True, False
    if u < cfg.drop_image_prob + cfg.drop_text_prob:
        return False, True
    if u < cfg.drop_image_prob + cfg.drop_text_prob + cfg.drop_both_prob:
        return True, True
    return False, False


def reference_augment(cfg: DataConfig) -> ReferenceAugment | None:
    """The data config's reference augmentation, or None when it is all off."""
    return ReferenceAugment.of(cfg.reference_crop, cfg.reference_flip_prob, cfg.reference_shuffle_grid,
                               cfg.clip_image_size)
