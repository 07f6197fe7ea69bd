"""Procedural style/content dataset with exact ground truth.

Content is one object (shape, position, scale); style is a palette, a fill
texture, an outline and a background. Both are sampled independently so a
model (or a metric) can separate them, and every attribute is stored in the
sample's JSON so later evaluation can check palette, texture and object
presence exactly.

    python -m data_tools.synthetic --out DIR --num N [--size 128] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from data_tools.shards import Manifest, Sample, ShardRecord, sample_key, shard_name, write_manifest, write_shard
from instantstyle.errors import OutputPathError
from instantstyle.generate import HelpFormatter
from instantstyle.safe_paths import make_output_dir

RGB = tuple[int, int, int]

SHAPES: list[str] = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "heart"]
# Palette name → (primary fill, secondary pattern colour).
PALETTES: dict[str, tuple[RGB, RGB]] = {
    "crimson": ((200, 30, 45), (255, 200, 80)),
    "tangerine": ((245, 130, 20), (110, 40, 10)),
    "lemon": ((240, 215, 40), (90, 90, 20)),
    "emerald": ((30, 160, 80), (200, 240, 200)),
    "teal": ((20, 140, 150), (240, 230, 200)),
    "cobalt": ((30, 70, 200), (160, 200, 255)),
    "violet": ((130, 50, 190), (240, 190, 250)),
    "rose": ((240, 110, 160), (110, 20, 60)),
}
TEXTURES: list[str] = ["flat", "stripes", "dots", "checker", "grid", "noise"]
STROKES: list[str] = ["none", "thin", "thick"]
STROKE_COLOURS: dict[str, RGB] = {"black": (20, 20, 20), "white": (250, 250, 250), "gold": (212, 175, 55)}
BACKGROUNDS: list[str] = ["solid", "stripes", "dots", "checker", "gradient"]
BACKGROUND_COLOURS: dict[str, RGB] = {
    "white": (245, 245, 245), "cream": (240, 228, 200), "grey": (150, 150, 150), "charcoal": (50, 50, 55),
    "navy": (25, 35, 90), "sky": (140, 190, 235), "mint": (170, 225, 195), "sand": (210, 180, 130),
}
ORIENTATIONS: list[str] = ["horizontal", "vertical", "diagonal"]
CONTENT_ONLY_PROB = 0.2

_TEXTURE_PHRASES = {
    "flat": "", "stripes": " with stripes", "dots": " with polka dots", "checker": " with a checker pattern",
    "grid": " with a grid pattern", "noise": " with a grainy texture",
}
_BACKGROUND_ADJECTIVES = {"solid": "", "stripes": "striped ", "dots": "dotted ", "checker": "checkered ", "gradient": ""}


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def sample_attributes(rng: np.random.Generator) -> dict:
    """Draw content (shape, place, scale) and style (palette, texture, stroke, background) independently."""
    radius = float(rng.uniform(0.22, 0.36))  # large enough that a 16×16 latent resolves the silhouette
    palette, background_colour = _pick(rng, list(PALETTES)), _pick(rng, list(BACKGROUND_COLOURS))
    stroke_colour = _pick(rng, list(STROKE_COLOURS))
    primary, secondary = PALETTES[palette]
    return {
        "shape": _pick(rng, SHAPES),
        "center": [float(rng.uniform(radius, 1 - radius)), float(rng.uniform(radius, 1 - radius))],
        "radius": radius,
        "palette": palette,
        "palette_rgb": {"primary": list(primary), "secondary": list(secondary)},
        "texture": _pick(rng, TEXTURES),
        "texture_period": float(rng.uniform(1 / 14, 1 / 8)),
        "texture_orientation": _pick(rng, ORIENTATIONS),
        "stroke": _pick(rng, STROKES),
        "stroke_colour": stroke_colour,
        "stroke_rgb": list(STROKE_COLOURS[stroke_colour]),
        "background": _pick(rng, BACKGROUNDS),
        "background_colour": background_colour,
        "background_rgb": list(BACKGROUND_COLOURS[background_colour]),
        "background_period": float(rng.uniform(1 / 10, 1 / 5)),
        "background_orientation": _pick(rng, ORIENTATIONS),
        "noise_seed": int(rng.integers(2**31)),
    }


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(radius * math.cos(phase + 2 * math.pi * i / n), radius * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]


def _heart(n: int = 72) -> list[tuple[float, float]]:
    ts = [2 * math.pi * i / n for i in range(n)]
    return [(16 * math.sin(t) ** 3 / 17, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)) / 17) for t in ts]


def shape_outline(shape: str) -> list[tuple[list[tuple[float, float]], bool]]:
    """Polygons of a shape in unit coordinates (centre 0, radius 1) as (points, is_hole)."""
    star = [p for i, pair in enumerate(zip(_regular(5), _regular(5, 0.45, -math.pi / 2 + math.pi / 5))) for p in pair]
    arm = 0.32
    cross = [(-arm, -1), (arm, -1), (arm, -arm), (1, -arm), (1, arm), (arm, arm), (arm, 1), (-arm, 1),
             (-arm, arm), (-1, arm), (-1, -arm), (-arm, -arm)]
    outlines = {
        "circle": [(_regular(64), False)],
        "square": [([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)], False)],
        "triangle": [(_regular(3), False)],
        "star": [(star, False)],
        "cross": [(cross, False)],
        "ring": [(_regular(64), False), (_regular(64, 0.55), True)],
        "diamond": [([(0, -1), (0.7, 0), (0, 1), (-0.7, 0)], False)],
        "heart": [(_heart(), False)],
    }
    if shape not in outlines:
        raise ValueError(f"unknown shape {shape!r} — valid: {', '.join(SHAPES)}")
    return outlines[shape]


def _pattern(kind: str, size: int, c1: RGB, c2: RGB, period: float, orientation: str, seed: int) -> np.ndarray:
    """A size×size RGB pattern: c1 base, c2 marks covering under half the area (except checker)."""
    p = max(3.0, period * size)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    along = {"horizontal": y, "vertical": x, "diagonal": (x + y) / math.sqrt(2)}[orientation]
    if kind in ("flat", "solid"):
        marks = np.zeros((size, size), bool)
    elif kind == "stripes":
        marks = (along % p) < p / 3
    elif kind == "dots":
        marks = ((x % p - p / 2) ** 2 + (y % p - p / 2) ** 2) < (p / 4) ** 2
    elif kind == "checker":
        marks = ((x // p + y // p) % 2) == 1
    elif kind == "grid":
        marks = ((x % p) < max(1.0, p / 8)) | ((y % p) < max(1.0, p / 8))
    elif kind == "noise":
        jitter = np.random.default_rng(seed).normal(0, 12, (size, size, 1))
        return np.clip(np.asarray(c1, np.float32) + jitter, 0, 255).astype(np.uint8)
    elif kind == "gradient":
        t = (along / along.max())[..., None]
        return (np.asarray(c1, np.float32) * (1 - t) + np.asarray(c2, np.float32) * t).round().astype(np.uint8)
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    return np.where(marks[..., None], np.asarray(c2, np.uint8), np.asarray(c1, np.uint8))


def _shade(colour: RGB) -> RGB:
    """A darker or lighter variant of a background colour for its pattern marks."""
    target = 0 if sum(colour) > 3 * 128 else 255
    return tuple(int(round(c * 0.7 + target * 0.3)) for c in colour)  # type: ignore[return-value]


def stroke_width(stroke: str, size: int) -> int:
    """Outline width in pixels for a stroke name at an image size."""
    return {"none": 0, "thin": max(1, size // 64), "thick": max(2, size // 24)}[stroke]


def object_mask(attributes: dict, size: int) -> Image.Image:
    """Binary (L) mask of the object's filled area, without the outline."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for points, is_hole in _placed_polygons(attributes, size):
        draw.polygon(points, fill=0 if is_hole else 255)
    return mask


def _placed_polygons(attributes: dict, size: int) -> list[tuple[list[tuple[float, float]], bool]]:
    cx, cy = (c * size for c in attributes["center"])
    r = attributes["radius"] * size
    return [([(cx + r * px, cy + r * py) for px, py in pts], hole) for pts, hole in shape_outline(attributes["shape"])]


def render(attributes: dict, size: int) -> Image.Image:
    """Render attributes to a crisp size×size RGB image (no anti-aliasing: colours stay exact)."""
    a = attributes
    bg = _pattern(a["background"], size, tuple(a["background_rgb"]), _shade(tuple(a["background_rgb"])),
                  a["background_period"], a["background_orientation"], a["noise_seed"] + 1)
    primary, secondary = (tuple(a["palette_rgb"][k]) for k in ("primary", "secondary"))
    fill = _pattern(a["texture"], size, primary, secondary, a["texture_period"], a["texture_orientation"], a["noise_seed"])
    mask = np.asarray(object_mask(a, size)) > 0
    image = Image.fromarray(np.where(mask[..., None], fill, bg))
    width = stroke_width(a["stroke"], size)
    if width:
        draw = ImageDraw.Draw(image)
        for points, _ in _placed_polygons(a, size):
            draw.line(points + points[:1], fill=tuple(a["stroke_rgb"]), width=width, joint="curve")
    return image


def content_caption(attributes: dict) -> str:
    """Caption naming only the content: 'a circle'."""
    return f"a {attributes['shape']}"


def caption(attributes: dict, rng: np.random.Generator) -> str:
    """Caption naming the content and usually the style."""
    a = attributes
    if rng.random() < CONTENT_ONLY_PROB:
        return content_caption(a)
    outline = f"{a['stroke_colour']}-outlined " if a["stroke"] != "none" else ""
    thick = "thick " if a["stroke"] == "thick" else ""
    background = _BACKGROUND_ADJECTIVES[a["background"]] + a["background_colour"]
    background += " gradient" if a["background"] == "gradient" else ""
    return f"a {thick}{outline}{a['palette']} {a['shape']}{_TEXTURE_PHRASES[a['texture']]} on a {background} background"


def _encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


CAPTION_KINDS = ("full", "content")


def make_sample(index: int, size: int, seed: int, image_format: str = "png", captions: str = "full") -> Sample:
    """Sample `index` of the dataset for `seed`: independent of every other index.

    ``captions="content"`` writes only the object ("a circle") to ``.txt``: the adapter then has to
    learn the style from the image, as when real captions do not describe the style.
    """
    rng = np.random.default_rng([seed, index])
    attributes = sample_attributes(rng)
    image = render(attributes, size)
    text = content_caption(attributes) if captions == "content" else caption(attributes, rng)
    bbox = object_mask(attributes, size).getbbox()
    meta = {
        "key": sample_key(index), "width": size, "height": size, "caption": text,
        "content_caption": content_caption(attributes), "attributes": attributes,
        "bbox": list(bbox) if bbox else None, "source": f"synthetic:{seed}:{index}",
    }
    members = {image_format: _encode(image, image_format), "txt": text.encode("utf-8"),
               "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
    return Sample(sample_key(index), members)


def write_synthetic_shards(out: str | Path, num: int, size: int = 128, seed: int = 0, per_shard: int = 1000,
                           image_format: str = "png", captions: str = "full") -> Manifest:
    """Write `num` samples as shards `out/00000.tar…` plus `out/manifest.json`; same seed → same bytes."""
    if num < 1 or size < 16 or per_shard < 1:
        raise ValueError("need --num ≥ 1, --size ≥ 16 and --per-shard ≥ 1")
    if captions not in CAPTION_KINDS:
        raise ValueError(f"captions={captions!r}: use one of {', '.join(CAPTION_KINDS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(options={"generator": "synthetic", "num": num, "size": size, "seed": seed,
                                 "per_shard": per_shard, "format": image_format, "captions": captions})
    with tqdm(total=num, desc="synthetic", unit="img") as bar:
        for shard, start in enumerate(range(0, num, per_shard)):
            samples = [make_sample(i, size, seed, image_format, captions) for i in range(start, min(num, start + per_shard))]
            nbytes = write_shard(out / shard_name(shard), samples)
            manifest.shards.append(ShardRecord(shard_name(shard), len(samples), nbytes, start, start + len(samples)))
            bar.update(len(samples))
    manifest.complete = True
    write_manifest(out, manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    """Command-line entry: parse flags and write the shards."""
    parser = argparse.ArgumentParser(prog="python -m data_tools.synthetic",
                                     description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="output directory for shards + manifest.json")
    parser.add_argument("--num", type=int, required=True, help="number of samples")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per tar shard")
    parser.add_argument("--format", choices=["png", "jpg"], default="png", help="png keeps colours exact")
    parser.add_argument("--captions", choices=CAPTION_KINDS, default="full",
                        help="full: content and usually style; content: only the object")
    args = parser.parse_args(argv)
    try:
        make_output_dir(args.out, f"--out {args.out}")
        manifest = write_synthetic_shards(args.out, args.num, args.size, args.seed, args.per_shard, args.format,
                                          args.captions)
    except OutputPathError as err:  # --out a file, a device, under /proc; a full disk
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    shards = len(manifest.shards)
    print(f"wrote {manifest.num_samples} samples in {shards} shard{'s' * (shards != 1)} to {args.out}")


if __name__ == "__main__":
    main()
