"""Safe, streaming reading of WebDataset tar shards into raw samples.

Only images, text and JSON are ever decoded; every other member (`.pyd`,
`.pickle`, `.pth`, …) stays opaque bytes, so a shard can never make us
unpickle anything. The tar parser is our own (≈60 lines) because stdlib
`tarfile` silently treats an archive cut at a header boundary as complete,
and we must count truncated shards.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "caption", "text")
_BLOCK = 512


class BadSample(Exception):
    """A sample that must be skipped; `reason` is the short counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class TruncatedTar(Exception):
    """The shard ended (or broke) before its end-of-archive marker."""


@dataclass
class RawSample:
    """Undecoded members of one sample, or a placeholder with an `error` reason."""

    key: str
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None


@contextlib.contextmanager
def open_shard(url: str) -> Iterator[BinaryIO]:
    """Open a local path, `file://`, `pipe:CMD` or any fsspec URL as a binary stream."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, bufsize=1 << 20)
        try:
            yield proc.stdout  # type: ignore[misc]
        except BaseException:
            proc.kill()  # we stopped reading early: the command's exit status means nothing
            raise
        finally:
            proc.stdout.close()  # type: ignore[union-attr]
        if proc.wait() != 0:
            raise TruncatedTar(f"command exited with status {proc.returncode}")
    elif "://" in url and not url.startswith("file://"):
        import fsspec  # only needed for remote shards

        with fsspec.open(url, "rb") as stream:
            yield stream
    else:
        with open(url.removeprefix("file://"), "rb", buffering=1 << 20) as stream:
            yield stream


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    while data is not None and len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            raise TruncatedTar(f"wanted {size} bytes, got {len(data)}")
        data += more
    return data


def _skip(stream: BinaryIO, size: int) -> None:
    # Seek over member data when we can: skipping consumed samples costs no I/O.
    if size and getattr(stream, "seekable", lambda: False)():
        end = stream.seek(size, io.SEEK_CUR)
        if end > stream.seek(0, io.SEEK_END) or stream.seek(end) != end:
            raise TruncatedTar("member data runs past the end of the file")
    elif size:
        _read_exact(stream, size)


def _parse_header(block: bytes) -> tuple[str, int, bytes]:
    stored = block[148:156].split(b"\0")[0].strip()
    expected = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if not stored or int(stored, 8) != expected:
        raise TruncatedTar("corrupt tar header (bad checksum)")
    name = block[0:100].split(b"\0")[0].decode("utf-8", "replace")
    prefix = block[345:500].split(b"\0")[0].decode("utf-8", "replace") if block[257:262] == b"ustar" else ""
    size = int(block[124:136].split(b"\0")[0].strip() or b"0", 8)
    return (f"{prefix}/{name}" if prefix else name), size, block[156:157]


def iter_members(stream: BinaryIO, want_data: Callable[[str], bool] = lambda name: True) -> Iterator[tuple[str, bytes | None]]:
    """Yield (name, data) for regular files; data is None where `want_data(name)` is False."""
    long_name: str | None = None
    while True:
        block = stream.read(_BLOCK)
        if not block:
            raise TruncatedTar("no end-of-archive marker")
        if len(block) < _BLOCK:
            block += _read_exact(stream, _BLOCK - len(block))
        if block == b"\0" * _BLOCK:
            return
        name, size, kind = _parse_header(block)
        padded = -size % _BLOCK
        if kind in (b"x", b"L"):  # pax / GNU long-name records carry the next member's path
            meta = _read_exact(stream, size)
            _skip(stream, padded)
            long_name = _long_name(meta, kind) or long_name
            continue
        name, long_name = long_name or name, None
        if kind not in (b"0", b"\0"):
            _skip(stream, size + padded)
            continue
        if want_data(name):
            data = _read_exact(stream, size)
            _skip(stream, padded)
            yield name, data
        else:
            _skip(stream, size + padded)
            yield name, None


def _long_name(meta: bytes, kind: bytes) -> str | None:
    if kind == b"L":
        return meta.split(b"\0")[0].decode("utf-8", "replace")
    for line in meta.decode("utf-8", "replace").splitlines():
        _, _, record = line.partition(" ")
        if record.startswith("path="):
            return record[5:]
    return None


def split_name(name: str) -> tuple[str, str]:
    """WebDataset rule: key = path up to the first dot of the file name, ext = the rest (lower case)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def iter_samples(stream: BinaryIO, shard: str, keep: Callable[[int], bool] = lambda i: True,
                 progress: list[int] | None = None) -> Iterator[RawSample]:
    """Group consecutive members by key; samples whose index fails `keep` are passed over unread.

    `progress[0]` counts complete samples, so a caller catching TruncatedTar knows how far the shard got.
    """
    progress = progress if progress is not None else [0]
    index, current = -1, None

    def want(name: str) -> bool:
        same = current is not None and split_name(name)[0] == current.key
        return keep(index if same else index + 1)

    for name, data in iter_members(stream, want):
        key, ext = split_name(name)
        if current is None or key != current.key:
            if current is not None:
                progress[0] = index + 1
                if keep(index):
                    yield current
            index, current = index + 1, RawSample(key, shard)
        if data is not None:
            current.members[ext] = data
    if current is not None:
        progress[0] = index + 1
        if keep(index):
            yield current


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


def decode_meta(members: dict[str, bytes]) -> dict:
    """The sample's JSON metadata ({} if absent); BadSample if it does not parse."""
    if "json" not in members:
        return {}
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadSample("bad json", str(error)) from None
    if not isinstance(meta, dict):
        raise BadSample("bad json", "not an object")
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


def load_image(image: Image.Image) -> Image.Image:
    """Decode pixels to RGB; BadSample('truncated image') when the data is cut short or corrupt."""
    try:
        image.load()
        if image.mode != "RGB":
            image = _to_rgb(image)
    except Image.DecompressionBombError as error:
        raise BadSample("image over pixel limit", str(error)) from None
    except (OSError, ValueError, SyntaxError) as error:
        raise BadSample("truncated image", str(error)) from None
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    # Transparent pixels go on white rather than PIL's default black.
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
