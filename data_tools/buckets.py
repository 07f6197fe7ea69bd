"""Aspect-ratio buckets: the SDXL set of training sizes, and which one each image goes to.

SDXL was fine-tuned on 41 (width, height) buckets: every pair of multiples of 64 with sides in
[512, 2048] and area in [0.9, 1]·1024² (the table in the SDXL report's appendix is exactly this
rule). A base resolution of 512 or 768 scales the rule (sides in [base/2, 2·base], area ≈ base²).
Each image trains at the bucket closest to its own aspect ratio (`data_tools.transforms.nearest_bucket`),
so little of it is cropped away, and a batch holds one bucket's samples (one tensor shape).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Sequence

from data_tools.transforms import nearest_bucket

Size = tuple[int, int]  # (width, height)
STEP = 64  # every side a multiple of 64: the VAE (÷8) and the UNet's downsamplers (÷8) divide it


def sdxl_buckets(base: int = 1024) -> list[Size]:
    """The SDXL bucket set around base² (exactly the published 41 sizes at 1024)."""
    area = base * base
    sides = range(_round_up(base // 2), 2 * base + 1, STEP)
    return [(w, h) for h in sides for w in sides if 0.9 * area <= w * h <= area]


def _round_up(side: int) -> int:
    return max(STEP, -(-side // STEP) * STEP)


def parse_buckets(spec: Any, resolution: int) -> list[Size] | None:
    """``none`` → None (square crops at ``resolution``), ``sdxl`` → the set at ``resolution``, or a [[w, h], …] list."""
    if spec is None or (isinstance(spec, str) and spec.lower() == "none"):
        return None
    if isinstance(spec, str):
        if spec.lower() != "sdxl":
            raise ValueError(f"data.buckets={spec!r} — valid: none, sdxl, or a list like [[1024, 1024], [1152, 896]]")
        if resolution < STEP:
            raise ValueError(f"data.buckets=sdxl needs a resolution ≥ {STEP}, its sides being multiples of {STEP} "
                             f"(got {resolution}): use data.buckets=none")
        return sdxl_buckets(resolution)
    sizes = [tuple(int(v) for v in pair) for pair in spec]
    if not sizes or any(len(s) != 2 or min(s) <= 0 or s[0] % 8 or s[1] % 8 for s in sizes):
        raise ValueError(f"data.buckets: every bucket is [width, height], positive multiples of 8 (got {list(spec)})")
    return sizes  # type: ignore[return-value]


def bucket_histogram(sizes: Iterable[Size], buckets: Sequence[Size]) -> Counter:
    """How many images of these (width, height) sizes fall in each bucket (every bucket listed)."""
    counts = Counter({b: 0 for b in buckets})
    for width, height in sizes:
        counts[nearest_bucket(width, height, buckets)] += 1
    return counts


def format_histogram(counts: Counter) -> str:
    """Bucket lines ``  1152×896 (1.29): 12`` for the non-empty buckets, widest first."""
    rows = [f"  {w:>5}×{h:<5} ({w / h:.2f}): {n}" for (w, h), n in sorted(counts.items(), key=lambda kv: -kv[0][0] / kv[0][1])
            if n]
    return "\n".join(rows) if rows else "  (no images)"
