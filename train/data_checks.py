"""Data settings against the files they name: which shards, which buckets, what a cache was made with.

``train.checks.check_data`` calls these once, before anything heavy loads; each failure is one
``ConfigError`` line that names the command which fixes it.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

from train.config import ConfigError, DataConfig

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PREVIEW_SAMPLES = 256  # image headers read for the bucket histogram at start (the first local shard)


def image_folder(spec: Any) -> Path | None:
    """The folder ``data.shards`` names when it holds images and no shards (else None)."""
    if not isinstance(spec, str) or "://" in spec or spec.startswith("pipe:"):
        return None
    folder = Path(spec).expanduser()
    if not folder.is_dir() or any(folder.glob("*.tar")):
        return None
    return folder if any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*")) else None


def expand_data_shards(spec: Any) -> list[str]:
    """The shard list of ``data.shards``; an image folder is answered with the command that makes its shards."""
    from data_tools.shards import expand_shards

    images = image_folder(spec)
    if images is not None:
        out = f"{str(images).rstrip('/')}-shards"
        raise ConfigError(f"data.shards={spec} holds images, not shards: python -m data_tools.make_shards --input "
                          f"{spec} --out {out} (captions from each image's .txt), then data.shards={out}")
    try:
        return expand_shards(spec)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def check_buckets(data: DataConfig) -> list[tuple[int, int]] | None:
    """The bucket sizes at ``data.resolution`` (None = square crops); a set that collapses is said in one line."""
    from data_tools.buckets import parse_buckets, sdxl_buckets

    buckets = parse_buckets(data.buckets, data.resolution)
    if buckets is None:
        return None
    if isinstance(data.buckets, str) and len(buckets) == 1:
        (w, h), = buckets
        log.warning("data.buckets=%s at data.resolution=%d is the one bucket %dx%d (sides are multiples of 64): "
                    "every image trains square, as with data.buckets=none; data.resolution=512 gives %d buckets, "
                    "1024 the published %d", data.buckets, data.resolution, w, h, len(sdxl_buckets(512)),
                    len(sdxl_buckets(1024)))
    return buckets


def log_bucket_histogram(buckets: list[tuple[int, int]] | None, urls: list[str]) -> None:
    """Which buckets the first local shard's images fall in (image headers only), so a skew shows at start."""
    from PIL import Image, UnidentifiedImageError

    from data_tools.buckets import bucket_histogram, format_histogram
    from data_tools.decode import BadSample, image_member
    from data_tools.shards import TruncatedTar, iter_samples, open_shard

    if buckets is None or not urls or "://" in urls[0] or urls[0].startswith("pipe:"):
        return
    sizes = []
    try:
        with open_shard(urls[0]) as stream:
            for raw in iter_samples(stream, urls[0]):
                try:
                    sizes.append(Image.open(io.BytesIO(image_member(raw.members))).size)
                except (BadSample, UnidentifiedImageError, OSError):
                    continue  # the loader skips and counts it
                if len(sizes) >= PREVIEW_SAMPLES:
                    break
    except (TruncatedTar, OSError):
        pass  # the loader reports a broken shard
    log.info("%d buckets; the first %d images of %s fall in:\n%s", len(buckets), len(sizes),
             os.path.basename(urls[0]), format_histogram(bucket_histogram(sizes, buckets)))
