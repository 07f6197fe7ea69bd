"""Contact sheets of generated images, with optional labels over the columns and left of the rows."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

PAD = 4  # pixels around label text
HEADER_LINES = 3  # longer column labels are cut with "…"
INK = (0, 0, 0)
Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def make_grid(images: Sequence[Image.Image], rows: int, cols: int, *, cell: int | None = None,
              background: tuple[int, int, int] = (255, 255, 255), column_labels: Sequence[str] | None = None,
              row_labels: Sequence[str] | None = None) -> Image.Image:
    """Row-major grid of ``rows × cols`` cells (missing cells stay blank); ``cell`` resizes to a square.

    ``column_labels`` form a header row over the columns, ``row_labels`` a column at the left
    (``\\n`` starts a new line); long labels are wrapped and then cut to fit.
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    if rows * cols < len(images):
        raise ValueError(f"{len(images)} images do not fit a {rows}x{cols} grid")
    if column_labels is not None and len(column_labels) != cols or row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"need {cols} column labels and {rows} row labels")
    width, height = (cell, cell) if cell else images[0].size
    font = label_font(width)
    headers = [wrap(label, font, width - 2 * PAD, HEADER_LINES) for label in column_labels or []]
    top = max(len(lines) for lines in headers) * line_height(font) + 2 * PAD if headers else 0
    max_lines = max(1, (height - 2 * PAD) // line_height(font))
    sides = [wrap(label, font, max(width, 128) - 2 * PAD, max_lines) for label in row_labels or []]
    left = max(text_width(font, line) for lines in sides for line in lines) + 2 * PAD if sides else 0
    grid = Image.new("RGB", (left + cols * width, top + rows * height), background)
    for i, image in enumerate(images):
        tile = image.convert("RGB")
        if tile.size != (width, height):
            tile = tile.resize((width, height), Image.Resampling.BICUBIC)
        grid.paste(tile, (left + (i % cols) * width, top + (i // cols) * height))
    draw = ImageDraw.Draw(grid)
    for col, lines in enumerate(headers):
        draw_lines(draw, font, lines, left + col * width, PAD, width, centre=True)
    for row, lines in enumerate(sides):
        draw_lines(draw, font, lines, 0, top + row * height + PAD, left, centre=False)
    return grid


def label_font(cell_width: int) -> Font:
    """PIL's default font, a little larger on large cells."""
    try:
        return ImageFont.load_default(size=max(10, cell_width // 20))
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def line_height(font: Font) -> int:
    """Pixels from one line of text to the next."""
    return font.getbbox("Ag")[3] + 2


def text_width(font: Font, text: str) -> int:
    """Rendered width of ``text`` in pixels."""
    return font.getbbox(text)[2] if text else 0


def wrap(text: str, font: Font, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; words wider than a line are split, extra lines cut with "…"."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if text_width(font, candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            *full, line = split_word(word, font, width)
            lines += full
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and text_width(font, last + "…") > width:
            last = last[:-1]
        lines = lines[:max_lines - 1] + [last + "…"]
    return lines


def split_word(word: str, font: Font, width: int) -> list[str]:
    """Pieces of ``word`` that each fit ``width`` pixels (at least one character each)."""
    pieces = []
    while word:
        cut = len(word)
        while cut > 1 and text_width(font, word[:cut]) > width:
            cut -= 1
        pieces.append(word[:cut])
        word = word[cut:]
    return pieces


def draw_lines(draw: ImageDraw.ImageDraw, font: Font, lines: list[str], x: int, y: int, width: int, *,
               centre: bool) -> None:
    """Draw ``lines`` from ``(x, y)`` downwards, centred in ``width`` or left-aligned after the padding."""
    for i, line in enumerate(lines):
        offset = (width - text_width(font, line)) // 2 if centre else PAD
        draw.text((x + offset, y + i * line_height(font)), line, fill=INK, font=font)
