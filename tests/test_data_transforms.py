"""SDXL transforms: original size, crop coordinates, pixels at the crop, flips, JPEG draft decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import torch

from data_tools.transforms import cover_size, crop_top_left, prepare_image, resize


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def assert_within_one_level(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal to PIL's filter up to rounding: no pixel off by more than one level, and few off at all."""
    diff = np.abs(actual.astype(int) - np.asarray(expected).astype(int))
    assert actual.shape == np.asarray(expected).shape and diff.max() <= 1 and diff.mean() < 0.05


def reference_crop(image: Image.Image, resolution: int, top: int, left: int) -> np.ndarray:
    """Resize the whole image (shorter side → resolution), then slice: the slow, obvious way."""
    new_w, new_h = cover_size(*image.size, resolution, resolution)
    resized = np.asarray(image.resize((new_w, new_h), Image.BILINEAR)).astype(int)
    return resized[top:top + resolution, left:left + resolution]


@pytest.mark.parametrize("width,height,expected_crop", [(80, 48, (0, 10)), (48, 80, (10, 0)), (64, 64, (0, 0))])
def test_center_crop_values_are_hand_computed(width, height, expected_crop):
    # 80×48 → shorter side 32 → 53×32 (int(32·80/48) = 53); centre: left = round((53 - 32) / 2) = round(10.5) = 10.
    image = random_image(width, height)
    out = prepare_image(image, 32, 16)
    assert out.original_size == (height, width) and out.crop_top_left == expected_crop
    assert out.pixels.shape == (32, 32, 3) and out.clip_pixels.shape == (16, 16, 3)
    assert_within_one_level(out.pixels, reference_crop(image, 32, *expected_crop))
    # The CLIP view comes from the crop itself.
    assert_within_one_level(out.clip_pixels, Image.fromarray(out.pixels).resize((16, 16), Image.BICUBIC))


def test_random_crop_uses_the_rng_and_pixels_match():
    image = random_image(80, 48, seed=1)
    out = prepare_image(image, 32, 16, random_crop=True, rng=np.random.default_rng(5))
    check = np.random.default_rng(5)
    top, left = int(check.integers(0, 1)), int(check.integers(0, 53 - 32 + 1))
    assert out.crop_top_left == (top, left) and out.original_size == (48, 80)
    assert_within_one_level(out.pixels, reference_crop(image, 32, top, left))
    lefts = {prepare_image(image, 32, 16, random_crop=True, rng=np.random.default_rng(s)).crop_top_left[1]
             for s in range(30)}
    assert len(lefts) > 5 and min(lefts) >= 0 and max(lefts) <= 21


def test_flip_mirrors_pixels_and_crop_left():
    image = random_image(80, 48, seed=2)
    rng_seed = next(s for s in range(100) if _flips(s))
    out = prepare_image(image, 32, 16, random_crop=True, random_flip=True, rng=np.random.default_rng(rng_seed))
    plain = prepare_image(image, 32, 16, random_crop=True, rng=np.random.default_rng(rng_seed))
    assert np.array_equal(out.pixels, plain.pixels[:, ::-1])
    assert out.crop_top_left == (plain.crop_top_left[0], 53 - plain.crop_top_left[1] - 32)


def _flips(seed: int) -> bool:
    rng = np.random.default_rng(seed)
    rng.integers(0, 1), rng.integers(0, 22)
    return rng.random() < 0.5


def test_jpeg_draft_decodes_small_but_keeps_true_geometry():
    y, x = np.mgrid[0:400, 0:600]
    smooth = np.stack([x * 255 // 600, y * 255 // 400, (x + y) * 255 // 1000], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(smooth).save(buffer, format="JPEG", quality=95)
    out = prepare_image(Image.open(io.BytesIO(buffer.getvalue())), 64, 16)
    # 600×400 → 96×64; draft decodes at 1/4 (150×100), still ≥ 64 on both sides.
    assert out.original_size == (400, 600) and out.crop_top_left == (0, 16)
    full = reference_crop(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), 64, 0, 16)
    assert np.abs(out.pixels.astype(int) - full).mean() < 3
    drafted = Image.open(io.BytesIO(buffer.getvalue()))
    drafted.draft("RGB", (64, 64))
    assert drafted.size == (150, 100)


def test_crop_helpers():
    assert cover_size(1500, 1000, 1024, 1024) == (1536, 1024) and cover_size(1000, 1500, 1024, 1024) == (1024, 1536)
    assert crop_top_left(1536, 1024, 1024, None) == (0, 256)


def photo(width: int, height: int) -> Image.Image:
    """Smooth gradients with shapes and grain, like the loader benchmark's photos (noise alone is no photo)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1).astype(float)
    base[height // 4:height // 2, width // 3:width // 2] = (200, 40, 90)
    grain = np.random.default_rng(0).normal(0, 6, base.shape)
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(640, 360), (360, 640), (500, 500), (200, 120)])
def test_a_large_photo_is_cropped_as_pils_filters_would_crop_it(size):
    """Resize up and down, square and bucketed: within one level of PIL's bilinear and bicubic everywhere."""
    image = photo(*size)
    for target in (256, (320, 192), (192, 320)):
        out = prepare_image(image, target, 64)
        width, height = (target, target) if isinstance(target, int) else target
        top, left = out.crop_top_left
        new_w, new_h = cover_size(*size, width, height)
        full = np.asarray(image.resize((new_w, new_h), Image.BILINEAR))[top:top + height, left:left + width]
        assert_within_one_level(out.pixels, full)
        side = min(width, height)
        square = Image.fromarray(out.pixels).crop(((width - side) // 2, (height - side) // 2,
                                                   (width - side) // 2 + side, (height - side) // 2 + side))
        assert_within_one_level(out.clip_pixels, square.resize((64, 64), Image.BICUBIC))
        assert out.pixels.flags.c_contiguous and out.clip_pixels.flags.c_contiguous


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_resize_is_torchs_public_antialiased_interpolate(mode):
    """The HWC fast path computes exactly what F.interpolate(antialias=True) computes, minus the transposes."""
    pixels = np.asarray(photo(300, 200)).copy()
    planar = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).contiguous()
    for width, height in ((120, 80), (451, 300), (97, 211)):
        expected = torch.nn.functional.interpolate(planar, size=(height, width), mode=mode,
                                                   antialias=True)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(resize(pixels, width, height, mode), expected)
    assert resize(pixels, 300, 200, mode) is pixels  # nothing to do
