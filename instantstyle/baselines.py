"""What each evaluation metric gives images that carry no style transfer, printed next to the scores.

A cosine in CLIP space is never near 0 for images of one kind: on the tiny random base, pure noise
scores 0.96 style similarity. Two yardsticks put a score in context:

- ``noise images``: uniform RGB noise of the generated size, scored exactly like the generated images;
- ``another style's reference``: each generated image against a reference it was NOT made from (and that
  reference's caption), so a style score above it is specific to the reference used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

NOISE = "noise images"
OTHER_REFERENCE = "another style's reference"


def noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    """Uniform RGB noise, the same for the same seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def metric_baselines(samples: Sequence[dict], styles: Sequence[str],
                     score: Callable[[list[dict]], None]) -> dict[str, dict[str, float | None]]:
    """Mean metrics of each baseline; ``score`` adds the metrics to sample dicts in place, as for the real ones."""
    from .metrics import mean_metrics  # torch and transformers: not at import, so --help stays instant

    noise = [{**s, "image": noise_image(s["image"].size, i)} for i, s in enumerate(samples)]
    score(noise)
    baselines = {NOISE: mean_metrics(noise)}
    if len(styles) > 1:
        other = {name: styles[(i + 1) % len(styles)] for i, name in enumerate(styles)}
        swapped = [{**s, "style": other[s["style"]]} for s in samples]
        score(swapped)
        means = mean_metrics(swapped)
        means["text_alignment"] = None  # the prompt is the same: no yardstick here
        baselines[OTHER_REFERENCE] = means
    return baselines
