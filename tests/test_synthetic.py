"""Synthetic data: deterministic, captions name the object, JSON attributes match the pixels."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter

import numpy as np
from PIL import Image, ImageFilter

from data_tools import synthetic as syn


def load(path) -> list[dict]:
    """Samples of a shard as {key, image, caption, meta}."""
    members = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            members.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [{"key": k, "image": np.asarray(Image.open(io.BytesIO(v["png"])).convert("RGB")),
             "caption": v["txt"].decode(), "meta": json.loads(v["json"])} for k, v in sorted(members.items())]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        syn.write_synthetic_shards(tmp_path / name, num=30, size=32, seed=seed, per_shard=16)
    files = ["00000.tar", "00001.tar", "manifest.json"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a" / "00000.tar").read_bytes() != (tmp_path / "c" / "00000.tar").read_bytes()
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [16, 14] and manifest["num_samples"] == 30


def test_captions_name_the_object_and_usually_the_style(tmp_path):
    syn.write_synthetic_shards(tmp_path, num=200, size=32, seed=0)
    samples = load(tmp_path / "00000.tar")
    for s in samples:
        attrs = s["meta"]["attributes"]
        assert attrs["shape"] in s["caption"].split() and s["meta"]["content_caption"] == f"a {attrs['shape']}"
        assert s["meta"]["caption"] == s["caption"] and (s["meta"]["width"], s["meta"]["height"]) == (32, 32)
        if s["caption"] != syn.content_caption(attrs):
            assert attrs["palette"] in s["caption"] and attrs["background_colour"] in s["caption"]
    content_only = sum(s["caption"] == s["meta"]["content_caption"] for s in samples) / len(samples)
    assert 0.1 < content_only < 0.3


def test_content_captions_keep_every_image_and_name_only_the_object(tmp_path):
    syn.write_synthetic_shards(tmp_path / "full", num=20, size=32, seed=0)
    syn.write_synthetic_shards(tmp_path / "content", num=20, size=32, seed=0, captions="content")
    full, content = load(tmp_path / "full" / "00000.tar"), load(tmp_path / "content" / "00000.tar")
    assert all(np.array_equal(f["image"], c["image"]) for f, c in zip(full, content))
    assert [c["caption"] for c in content] == [f["meta"]["content_caption"] for f in full]
    assert any(f["caption"] != c["caption"] for f, c in zip(full, content))


def test_style_and_content_are_sampled_independently():
    rng = np.random.default_rng(0)
    draws = [syn.sample_attributes(rng) for _ in range(2000)]
    pairs = Counter((d["shape"], d["palette"]) for d in draws)
    assert len(pairs) == len(syn.SHAPES) * len(syn.PALETTES)  # every combination occurs
    assert max(pairs.values()) < 3 * min(pairs.values())
    assert {d["texture"] for d in draws} == set(syn.TEXTURES) and {d["background"] for d in draws} == set(syn.BACKGROUNDS)
    assert len(syn.SHAPES) >= 8 and len(syn.PALETTES) >= 8 and len(syn.TEXTURES) >= 6


def _interior(attrs: dict, size: int) -> np.ndarray:
    """Object pixels at least a stroke width away from the outline."""
    erode = 2 * syn.stroke_width(attrs["stroke"], size) + 3
    return np.asarray(syn.object_mask(attrs, size).filter(ImageFilter.MinFilter(erode))) > 0


def test_rendered_pixels_match_the_attributes():
    size, checked = 96, Counter()
    for index in range(120):
        rng = np.random.default_rng([7, index])
        attrs = syn.sample_attributes(rng)
        image = np.asarray(syn.render(attrs, size)).astype(int)
        primary = np.array(attrs["palette_rgb"]["primary"])
        secondary = np.array(attrs["palette_rgb"]["secondary"])
        inside = image[_interior(attrs, size)]
        if len(inside) < 20:
            continue
        if attrs["texture"] == "noise":
            assert np.abs(np.median(inside, axis=0) - primary).max() <= 3
        else:
            is_primary = (inside == primary).all(1)
            # Only palette colours inside (a heart's cusp lets a few outline pixels in).
            assert (is_primary | (inside == secondary).all(1)).mean() > 0.98
            assert is_primary.mean() >= (0.3 if attrs["texture"] == "checker" else 0.5)  # primary dominates (checker: about half)
        outside = np.asarray(syn.object_mask(attrs, size).filter(ImageFilter.MaxFilter(9))) == 0
        if attrs["background"] not in ("gradient",) and outside.any():
            background = np.array(attrs["background_rgb"])
            colours = {tuple(c) for c in image[outside].tolist()}
            assert tuple(background) in colours and len(colours) <= 2
        checked[attrs["texture"]] += 1
    assert set(checked) == set(syn.TEXTURES)


def test_outline_uses_the_stroke_colour():
    rng = np.random.default_rng(1)
    attrs = {**syn.sample_attributes(rng), "shape": "square", "stroke": "thick", "stroke_colour": "gold",
             "stroke_rgb": list(syn.STROKE_COLOURS["gold"]), "center": [0.5, 0.5], "radius": 0.3}
    image = np.asarray(syn.render(attrs, 64))
    # The square spans ±0.8·radius: its left edge is x = 32 - 0.8·0.3·64 = 16.64; a 2-px outline covers x 15–16.
    gold = syn.STROKE_COLOURS["gold"]
    assert tuple(image[32, 16]) == gold and tuple(image[20, 16]) == gold and tuple(image[32, 12]) != gold
    no_stroke = np.asarray(syn.render({**attrs, "stroke": "none"}, 64))
    assert tuple(no_stroke[32, 16]) != gold and tuple(no_stroke[32, 16]) != tuple(image[32, 12])  # fill, not background


def test_bbox_in_json_matches_object(tmp_path):
    syn.write_synthetic_shards(tmp_path, num=20, size=64, seed=2)
    for s in load(tmp_path / "00000.tar"):
        attrs, (x0, y0, x1, y1) = s["meta"]["attributes"], s["meta"]["bbox"]
        cx, cy = (c * 64 for c in attrs["center"])
        assert x0 <= cx <= x1 and y0 <= cy <= y1 and 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        assert (x1 - x0) <= 2 * attrs["radius"] * 64 + 2
