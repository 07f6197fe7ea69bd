"""Aspect-ratio buckets: the SDXL set, nearest-bucket choice, cover-crop conditioning, one bucket per batch."""

from __future__ import annotations

import io
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_tools.buckets import bucket_histogram, format_histogram, nearest_bucket, parse_buckets, sdxl_buckets
from data_tools.shards import Manifest, Sample, ShardRecord, shard_name, write_manifest, write_shard
from data_tools.transforms import prepare_image
from train.config import ConfigError, DataConfig, section
from train.data import build_train_loader

SIZES = [(40, 24), (24, 40), (32, 32), (48, 24)]  # (width, height) cycled over the samples
BUCKETS = [[32, 32], [40, 24], [24, 40]]


def test_sdxl_set_is_the_published_table():
    buckets = sdxl_buckets(1024)
    assert len(buckets) == 41 and (1024, 1024) in buckets
    assert {(1152, 896), (896, 1152), (1216, 832), (1344, 768), (1536, 640), (2048, 512), (512, 2048)} <= set(buckets)
    assert all(w % 64 == 0 and h % 64 == 0 and 0.9 * 1024**2 <= w * h <= 1024**2 for w, h in buckets)
    assert sorted(buckets) == sorted((h, w) for w, h in buckets)  # closed under transposition
    small = sdxl_buckets(512)
    assert (512, 512) in small and all(w * h <= 512**2 and w % 64 == 0 and h % 64 == 0 for w, h in small)


def test_nearest_bucket_by_aspect_ratio():
    buckets = sdxl_buckets(1024)
    assert nearest_bucket(1500, 1000, buckets) == (1216, 832)  # 1.5 → 1.46 (1.67 is further)
    assert nearest_bucket(1000, 1500, buckets) == (832, 1216)
    assert nearest_bucket(777, 777, buckets) == (1024, 1024)
    assert nearest_bucket(10000, 100, buckets) == (2048, 512)  # clamps to the widest
    assert parse_buckets("none", 1024) is None and parse_buckets("sdxl", 768) == sdxl_buckets(768)
    assert parse_buckets(BUCKETS, 32) == [(32, 32), (40, 24), (24, 40)]


def test_histogram_for_inspect():
    counts = bucket_histogram([(1500, 1000), (1510, 1000), (1000, 1000)], sdxl_buckets(1024))
    assert counts[(1216, 832)] == 2 and counts[(1024, 1024)] == 1 and sum(counts.values()) == 3
    assert "1216×832" in format_histogram(counts) and "640" not in format_histogram(counts)


def test_bucket_crop_covers_and_records_sdxl_conditioning():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))
    out = prepare_image(image, (64, 40), 16)
    # 90×60 covering 64×40: width decides → 64×42 (int(64·60/90) = 42), centred: top = round(1.0) = 1.
    assert out.pixels.shape == (40, 64, 3) and out.original_size == (60, 90) and out.crop_top_left == (1, 0)
    reference = np.asarray(image.resize((64, 42), Image.BILINEAR)).astype(int)[1:41, 0:64]
    assert np.abs(out.pixels.astype(int) - reference).max() <= 1
    # The CLIP view is the crop's centred square (never squashed), at the encoder's size.
    square = Image.fromarray(out.pixels).crop((12, 0, 52, 40)).resize((16, 16), Image.BICUBIC)
    diff = np.abs(out.clip_pixels.astype(int) - np.asarray(square).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.05  # PIL's bicubic up to rounding
    flipped = prepare_image(image, (64, 40), 16, random_crop=True, random_flip=True, rng=np.random.default_rng(3))
    assert flipped.pixels.shape == (40, 64, 3) and 0 <= flipped.crop_top_left[0] <= 2


def png_bytes(seed: int, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def mixed_dataset(root: Path, num_shards: int = 4, per_shard: int = 9) -> dict[str, tuple[int, int]]:
    """Shards of images in several aspect ratios; returns key → (width, height)."""
    manifest, sizes = Manifest(complete=True), {}
    for shard in range(num_shards):
        samples = []
        for i in range(shard * per_shard, (shard + 1) * per_shard):
            key, size = f"{i:06d}", SIZES[i % len(SIZES)]
            samples.append(Sample(key, {"png": png_bytes(i, size), "txt": f"caption {i}".encode()}))
            sizes[key] = size
        manifest.shards.append(ShardRecord(shard_name(shard), per_shard, write_shard(root / shard_name(shard), samples)))
    write_manifest(root, manifest)
    return sizes


def bucket_cfg(root: Path, **overrides) -> dict:
    return {"shards": str(root / "*.tar"), "resolution": 32, "clip_image_size": 16, "num_workers": 0,
            "shuffle_buffer": 5, "buckets": BUCKETS, "random_crop": True, "random_flip": True, **overrides}


def test_every_batch_holds_one_bucket_with_matching_conditioning(tmp_path):
    sizes = mixed_dataset(tmp_path)
    loader = build_train_loader(bucket_cfg(tmp_path), batch_size=3, seed=0, rank=0, world_size=1)
    batches = list(itertools.islice(iter(loader), 20))
    shapes = Counter()
    for batch in batches:
        height, width = batch["pixel_values"].shape[1:3]
        assert batch["target_size"].tolist() == [[height, width]] * 3
        shapes[(width, height)] += 1
        for key, original in zip(batch["keys"], batch["original_size"].tolist()):
            w, h = sizes[key]
            assert original == [h, w] and nearest_bucket(w, h, [tuple(b) for b in BUCKETS]) == (width, height)
    assert set(shapes) == {(32, 32), (40, 24), (24, 40)}  # 48×24 joins 40×24
    assert batches[0]["clip_pixel_values"].shape[1:] == (16, 16, 3)


@pytest.mark.parametrize("workers", [0, 2])
def test_bucketed_resume_is_bitwise_with_pending_samples(tmp_path, workers):
    mixed_dataset(tmp_path)
    cfg = bucket_cfg(tmp_path, num_workers=workers)
    build = lambda: build_train_loader(cfg, batch_size=3, seed=1, rank=0, world_size=1)  # noqa: E731
    full = list(itertools.islice(iter(build()), 16))
    head = build()
    list(itertools.islice(iter(head), 7))
    state = json.loads(json.dumps(head.state_dict()))
    assert any(s["pending"] for s in state["streams"].values())  # other buckets' samples were waiting
    resumed = build()
    resumed.load_state_dict(state)
    tail = list(itertools.islice(iter(resumed), 9))
    for a, b in zip(tail, full[7:]):
        assert a["keys"] == b["keys"] and a["captions"] == b["captions"]
        for name in ("pixel_values", "clip_pixel_values", "crop_coords_top_left", "original_size", "target_size",
                     "drop_image"):
            assert torch.equal(a[name], b[name]), name


def test_bad_bucket_spec_is_one_line():
    with pytest.raises(ConfigError, match="data.buckets"):
        section({"shards": "x", "buckets": "square"}, "data", DataConfig)
    with pytest.raises(ConfigError, match="multiples of 8"):
        section({"shards": "x", "buckets": [[30, 32]]}, "data", DataConfig)
