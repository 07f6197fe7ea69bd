"""The shard format, in one place: locating, writing, reading and decoding WebDataset tar shards.

Shards follow img2dataset's layout: every sample is a group of members
`KEY.jpg|png|webp`, `KEY.txt`, `KEY.json` stored next to each other, and a
`manifest.json` beside the shards records each shard's sample count.

Writes are deterministic (fixed mtime/owner, fixed member order) so the same samples
always give byte-identical tars, and atomic (temp name, then rename) so an interrupted
run never leaves a shard that looks complete.

Reads decode only images, text and JSON; every other member (`.pyd`, `.pickle`, `.pth`, …)
stays opaque bytes, so a shard can never make us unpickle anything. The tar parser is our
own (≈60 lines) because stdlib `tarfile` silently treats an archive cut at a header boundary
as complete, and we must count truncated shards; it also seeks over samples a resumed run
has already consumed. Reading one sample is: open_shard → iter_members → iter_samples (a RawSample:
its members' bytes); decoding them is `data_tools.decode`'s job.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence

from braceexpand import braceexpand

from instantstyle.safe_paths import write_atomic


# --- locating shards -------------------------------------------------------

def local_shard_problem(url: str) -> str | None:
    """Why a local shard path cannot be read as a tar shard; None when it can (and for pipe: and remote URLs)."""
    if url.startswith("pipe:") or is_remote(url):
        return None
    path = url.removeprefix("file://")
    if os.path.isdir(path):
        return f"{path} is a folder, not a tar shard: give data.shards='{path.rstrip('/')}/*.tar'"
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.path.isfile(path):
        return f"{path} is not a regular file (a device, pipe or socket), so it is no tar shard"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable by this user"
    return None


def is_remote(url: str) -> bool:
    """True for fsspec URLs (``s3://…``, ``https://…``); False for local paths, ``file://`` and ``pipe:`` commands."""
    return "://" in url and not url.startswith(("file://", "pipe:"))


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Brace patterns, globs, folders, lists, `pipe:` commands and URLs → an ordered list of shard URLs."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        for url in braceexpand(str(item)):
            is_local = not url.startswith("pipe:") and "://" not in url
            if is_local and os.path.isdir(os.path.expanduser(url)) and not url.endswith(".tar"):
                url = os.path.join(url, "*.tar")  # a folder of shards means its shards (a "x.tar" folder is refused)
            if is_local and any(c in url for c in "*?["):
                urls.extend(sorted(glob.glob(os.path.expanduser(url))))
            else:
                urls.append(os.path.expanduser(url) if is_local else url)
    if not urls:
        raise ValueError(f"data.shards={spec!r} matched no shards — give a brace pattern, glob, list or URL")
    return urls


def shard_sample_counts(urls: Sequence[str]) -> list[int | None]:
    """Sample count of each local shard from the manifest.json next to it (None when unknown)."""
    cache: dict[str, dict[str, int]] = {}
    counts: list[int | None] = []
    for url in urls:
        if url.startswith("pipe:") or ("://" in url and not url.startswith("file://")):
            counts.append(None)
            continue
        path = url.removeprefix("file://")
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in cache:
            try:
                cache[folder] = manifest_counts(Path(folder))
            except (ValueError, OSError, TypeError):
                cache[folder] = {}  # an unreadable manifest only costs us the fast skip
        counts.append(cache[folder].get(os.path.basename(path)))
    return counts


# --- writing shards and the manifest ---------------------------------------

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

# Member order inside a sample: image first, so streaming readers see it early.
_MEMBER_ORDER = ("jpg", "jpeg", "png", "webp", "gif", "txt", "json")


@dataclass
class Sample:
    """One sample: its key and member bytes by extension (`jpg`, `txt`, `json`)."""

    key: str
    members: dict[str, bytes]


@dataclass
class ShardRecord:
    """What the manifest says about one finished shard."""

    name: str
    num_samples: int
    num_bytes: int
    first_record: int = 0
    end_record: int = 0

    def to_json(self) -> dict:
        return self.__dict__.copy()


@dataclass
class Manifest:
    """Per-shard sample counts plus the inputs that were skipped."""

    shards: list[ShardRecord] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    complete: bool = False
    options: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_json(self) -> dict:
        return {
            "version": MANIFEST_VERSION,
            "complete": self.complete,
            "num_samples": self.num_samples,
            "num_shards": len(self.shards),
            "shards": [s.to_json() for s in self.shards],
            "skipped": self.skipped,
            "options": self.options,
        }


def shard_name(index: int) -> str:
    """File name of shard `index` (`00000.tar`), the img2dataset convention."""
    return f"{index:05d}.tar"


def sample_key(index: int) -> str:
    """Zero-padded global sample key; sorts in input order."""
    return f"{index:09d}"


def _ordered_members(members: dict[str, bytes]) -> list[tuple[str, bytes]]:
    rank = {ext: i for i, ext in enumerate(_MEMBER_ORDER)}
    return sorted(members.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def tar_bytes(samples: Iterable[Sample]) -> bytes:
    """Serialise samples into one deterministic tar archive (in memory)."""
    buffer = io.BytesIO()
    # USTAR with fixed metadata: no timestamps or user names leak into the bytes.
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for ext, data in _ordered_members(sample.members):
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_shard(path: Path, samples: list[Sample]) -> int:
    """Write one shard atomically (never over a device or a symlink's target); returns its size in bytes."""
    data = tar_bytes(samples)
    write_atomic(path, data, "shard")
    return len(data)


def write_manifest(out_dir: Path, manifest: Manifest) -> None:
    """Write `out_dir/manifest.json` atomically (sorted keys: deterministic bytes)."""
    text = json.dumps(manifest.to_json(), indent=1, sort_keys=True) + "\n"
    write_atomic(Path(out_dir) / MANIFEST_NAME, text, "shard manifest")


def read_manifest(out_dir: Path) -> Manifest | None:
    """Read a manifest written by `write_manifest`; None if there is none."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    return manifest_from_json(json.loads(path.read_text("utf-8")), str(path))


def manifest_from_json(raw: dict, source: str) -> Manifest:
    """A parsed manifest.json (from `source`, named in errors) as a Manifest."""
    if not isinstance(raw, dict) or raw.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{source}: unsupported manifest version {raw.get('version') if isinstance(raw, dict) else raw!r}")
    shards = [ShardRecord(**s) for s in raw.get("shards", [])]
    return Manifest(shards, raw.get("skipped", []), bool(raw.get("complete")), raw.get("options", {}))


def manifest_counts(out_dir: Path) -> dict[str, int]:
    """Shard file name → sample count, from the manifest (empty if none)."""
    manifest = read_manifest(out_dir)
    return {} if manifest is None else {s.name: s.num_samples for s in manifest.shards}


# --- reading shards: stream → members → raw samples ------------------------

_BLOCK = 512


class TruncatedTar(Exception):
    """The shard ended (or broke) before its end-of-archive marker; `reason` is the short counter name."""

    reason = "truncated tar"


class NotATar(TruncatedTar):
    """The shard's first block is no tar header (random bytes, text, an image, a gzipped tar)."""

    reason = "not a tar"


class CommandFailed(TruncatedTar):
    """A ``pipe:`` shard's command exited with an error status."""

    reason = "pipe command failed"


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
        except TruncatedTar:
            if proc.wait() != 0:  # the stream broke because the command failed: say so, not "truncated"
                raise CommandFailed(f"{url[5:60]} exited with status {proc.returncode}") from None
            raise
        except BaseException:
            proc.kill()  # we stopped reading early: the command's exit status means nothing
            raise
        finally:
            proc.stdout.close()  # type: ignore[union-attr]
        if proc.wait() != 0:
            raise CommandFailed(f"{url[5:60]} exited with status {proc.returncode}")
    elif "://" in url and not url.startswith("file://"):
        import fsspec  # only needed for remote shards

        with fsspec.open(url, "rb") as stream:
            yield stream
    else:
        with open(url.removeprefix("file://"), "rb", buffering=1 << 20) as stream:
            yield stream


_CHUNK = 1 << 24


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    # In chunks: a corrupt size field (up to 8 GiB in 11 octal digits) must not allocate it up front.
    parts, got = [], 0
    while got < size:
        more = stream.read(min(size - got, _CHUNK))
        if not more:
            raise TruncatedTar(f"wanted {size} bytes, got {got}")
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _skip(stream: BinaryIO, size: int) -> None:
    # Seek over member data when we can: skipping consumed samples costs no I/O.
    if size and getattr(stream, "seekable", lambda: False)():
        end = stream.seek(size, io.SEEK_CUR)
        if end > stream.seek(0, io.SEEK_END) or stream.seek(end) != end:
            raise TruncatedTar("member data runs past the end of the file")
    elif size:
        _read_exact(stream, size)


def _octal(field: bytes, what: str) -> int:
    digits = field.split(b"\0")[0].strip() or b"0"
    if not all(48 <= c <= 55 for c in digits):  # int(…, 8) would also take "+", "_" and spaces
        raise TruncatedTar(f"corrupt tar header ({what} field {digits[:12]!r} is not octal)")
    return int(digits, 8)


def _parse_header(block: bytes) -> tuple[str, int, bytes]:
    expected = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if not block[148:156].strip(b"\0 ") or _octal(block[148:156], "checksum") != expected:
        raise TruncatedTar("corrupt tar header (bad checksum)")
    name = block[0:100].split(b"\0")[0].decode("utf-8", "replace")
    prefix = block[345:500].split(b"\0")[0].decode("utf-8", "replace") if block[257:262] == b"ustar" else ""
    size = _octal(block[124:136], "size")
    return (f"{prefix}/{name}" if prefix else name), size, block[156:157]


def iter_members(stream: BinaryIO, want_data: Callable[[str], bool] = lambda name: True) -> Iterator[tuple[str, bytes | None]]:
    """Yield (name, data) for regular files; data is None where `want_data(name)` is False."""
    long_name: str | None = None
    first = True
    while True:
        block = stream.read(_BLOCK)
        if not block:
            raise TruncatedTar("no end-of-archive marker")
        if len(block) < _BLOCK:
            block += _read_exact(stream, _BLOCK - len(block))
        if block == b"\0" * _BLOCK:
            return
        name, size, kind = _first_header(block) if first else _parse_header(block)
        first = False
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


def _first_header(block: bytes) -> tuple[str, int, bytes]:
    # A file whose very first block is no tar header is not a shard at all, not a damaged one.
    try:
        return _parse_header(block)
    except TruncatedTar:
        gzipped = block[:2] == b"\x1f\x8b"
        raise NotATar("gzip-compressed: gunzip it first" if gzipped else "its first 512 bytes are no tar header") from None


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
