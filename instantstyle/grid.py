"""Contact sheets of generated images."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image


def make_grid(images: Sequence[Image.Image], rows: int, cols: int, *, cell: int | None = None,
              background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Row-major grid of ``rows × cols`` cells (missing cells stay blank); ``cell`` resizes to a square."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    if rows * cols < len(images):
        raise ValueError(f"{len(images)} images do not fit a {rows}x{cols} grid")
    width, height = (cell, cell) if cell else images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), background)
    for i, image in enumerate(images):
        tile = image.convert("RGB")
        if tile.size != (width, height):
            tile = tile.resize((width, height), Image.Resampling.BICUBIC)
        grid.paste(tile, ((i % cols) * width, (i // cols) * height))
    return grid
