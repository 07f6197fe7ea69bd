"""Shared helpers to write WebDataset tar shards and their manifest.

Shards follow img2dataset's layout: every sample is a group of members
`KEY.jpg|png|webp`, `KEY.txt`, `KEY.json` stored next to each other.
Writes are deterministic (fixed mtime/owner, fixed member order) so the
same samples always give byte-identical tars, and atomic (temp name, then
rename) so an interrupted run never leaves a shard that looks complete.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

# Member order inside a sample: image first, so streaming readers see it early.
_MEMBER_ORDER = ("jpg", "jpeg", "png", "webp", "txt", "json")


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


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file and rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(path: Path, samples: list[Sample]) -> int:
    """Write one shard atomically; returns its size in bytes."""
    data = tar_bytes(samples)
    write_atomic(path, data)
    return len(data)


def write_manifest(out_dir: Path, manifest: Manifest) -> None:
    """Write `out_dir/manifest.json` atomically (sorted keys: deterministic bytes)."""
    text = json.dumps(manifest.to_json(), indent=1, sort_keys=True) + "\n"
    write_atomic(Path(out_dir) / MANIFEST_NAME, text.encode("utf-8"))


def read_manifest(out_dir: Path) -> Manifest | None:
    """Read a manifest written by `write_manifest`; None if there is none."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    raw = json.loads(path.read_text("utf-8"))
    if raw.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: unsupported manifest version {raw.get('version')!r}")
    shards = [ShardRecord(**s) for s in raw.get("shards", [])]
    return Manifest(shards, raw.get("skipped", []), bool(raw.get("complete")), raw.get("options", {}))


def manifest_counts(out_dir: Path) -> dict[str, int]:
    """Shard file name → sample count, from the manifest (empty if none)."""
    manifest = read_manifest(out_dir)
    return {} if manifest is None else {s.name: s.num_samples for s in manifest.shards}
