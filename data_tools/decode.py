"""Decode a raw sample's members: the image (upright 8-bit RGB), the caption and the JSON metadata.

Every way a member can be broken becomes `BadSample(reason)`, which the loader skips and counts by
reason; nothing here raises anything else on bad bytes. Only images, text and JSON are decoded.
"""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif")  # an animated GIF or WebP trains on its first frame
TEXT_EXTS = ("txt", "caption", "text")


class BadSample(Exception):
    """A sample that must be skipped; `reason` is the short counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def image_member(members: dict[str, bytes]) -> bytes:
    """The sample's image bytes; BadSample if absent or empty."""
    for ext in IMAGE_EXTS:
        if ext in members:
            if not members[ext]:
                raise BadSample("zero-byte image")
            return members[ext]
    raise BadSample("missing image")


def decode_caption(members: dict[str, bytes]) -> str:
    """The UTF-8 caption (stripped); BadSample if there is no text member."""
    for ext in TEXT_EXTS:
        if ext in members:
            try:
                return members[ext].decode("utf-8").strip()
            except UnicodeDecodeError as error:
                raise BadSample("bad caption", str(error)) from None
    raise BadSample("missing caption")


# Metadata that becomes SDXL conditioning (int64 time ids): absent/null, or a side length up to 2**20 px.
CONDITIONING_KEYS = ("original_height", "original_width")
MAX_SIDE = 2 ** 20


def decode_meta(members: dict[str, bytes]) -> dict:
    """The sample's JSON metadata ({} if absent); BadSample if it does not parse or a size is out of range."""
    if "json" not in members:
        return {}
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise BadSample("bad json", str(error)) from None
    if not isinstance(meta, dict):
        raise BadSample("bad json", "not an object")
    for key in CONDITIONING_KEYS:
        value = meta.get(key)
        # bool is an int in Python; a float or string here is a writer's bug, not a size.
        if value is not None and (type(value) is not int or not 0 < value <= MAX_SIDE):
            raise BadSample("bad metadata", f"{key}={str(value)[:40]} is not a side length in 1..{MAX_SIDE}")
    return meta


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only, not yet decoded) an image, refusing ones over `max_pixels`."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise BadSample("image over pixel limit", str(error)) from None
    except UnidentifiedImageError:
        raise BadSample("undecodable image", "not a recognised image format") from None
    except (OSError, ValueError) as error:
        raise BadSample("undecodable image", str(error)) from None
    width, height = image.size
    if width * height > max_pixels:
        raise BadSample("image over pixel limit", f"{width}x{height} > {max_pixels} pixels")
    return image


# EXIF orientations 5-8 turn the stored pixels by 90°: the image is shown (and trains) with its sides swapped.
_EXIF_ORIENTATION = 0x0112
_TURNED = (5, 6, 7, 8)


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1 = stored upright; 1 also when the tag is absent or unreadable)."""
    try:
        value = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, TypeError):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as it is meant to be seen, before decoding it."""
    width, height = image.size
    return (height, width) if orientation(image) in _TURNED else (width, height)


def decode_rgb(image: Image.Image) -> Image.Image:
    """Decode pixels to upright 8-bit RGB; BadSample('truncated image') when the data is cut short or corrupt."""
    try:
        turn = orientation(image)
        image.load()
        if image.mode != "RGB":
            image = _to_rgb(image)
        if turn != 1:
            image = image.transpose(_TRANSPOSE[turn])
    except Image.DecompressionBombError as error:
        raise BadSample("image over pixel limit", str(error)) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise BadSample("truncated image", str(error)) from None
    return image


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # ImageOps.exif_transpose's table


def _to_rgb(image: Image.Image) -> Image.Image:
    # Transparent pixels go on white rather than PIL's default black.
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I"):  # 16-bit grey (I;16*, or I holding 0..65535): PIL's convert would clip to white
        wide = np.asarray(image).astype(np.int64)
        return Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    return image.convert("RGB")
