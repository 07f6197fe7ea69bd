"""Turn images + captions into WebDataset tar shards in img2dataset's layout.

    python -m data_tools.make_shards --input SRC --out DIR [--image-root R]
        [--samples-per-shard 1000 | --max-shard-bytes B] [--max-side S]
        [--format jpg|png|webp|keep] [--workers N]

SRC is an image folder with sidecar `.txt` captions, a JSONL or CSV file
(image path + caption columns), or the IP-Adapter tutorial JSON
`[{"image_file": ..., "text": ...}]`. Output: `DIR/00000.tar`, … and
`DIR/manifest.json` (per-shard counts, skipped inputs). Same input → same
bytes; re-running resumes after the last complete shard.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageOps
from tqdm import tqdm

from data_tools.shards import Manifest, Sample, ShardRecord, read_manifest, sample_key, shard_name, write_manifest, write_shard
from instantstyle.errors import OutputPathError
from instantstyle.generate import HelpFormatter
from instantstyle.safe_paths import make_output_dir

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_COLUMNS = ("image", "image_path", "image_file", "file", "file_name", "filename", "path", "url")
CAPTION_COLUMNS = ("caption", "text", "prompt", "description", "title")
_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class Record:
    """One input row: where its image is, its caption, and extra columns to keep."""

    source: str
    path: Path | None
    caption: str | None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EncodeOptions:
    """How images are stored in the shards."""

    image_format: str = "keep"
    max_side: int | None = None
    quality: int = 95


def read_records(src: Path, image_root: Path | None = None, image_column: str | None = None,
                 caption_column: str | None = None) -> list[Record]:
    """Read any supported input into records, in a deterministic order."""
    if src.is_dir():
        return _folder_records(src)
    if not src.is_file():
        raise FileNotFoundError(f"--input {src} does not exist")
    suffix = src.suffix.lower()
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in src.read_text("utf-8").splitlines() if line.strip()]
    elif suffix == ".csv":
        with open(src, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif suffix == ".json":
        rows = json.loads(src.read_text("utf-8"))
        if not isinstance(rows, list):
            raise ValueError(f"{src}: expected a JSON list like [{{\"image_file\": ..., \"text\": ...}}]")
    else:
        raise ValueError(f"--input {src}: use a folder, .jsonl, .csv or .json")
    return _table_records(rows, image_root or src.parent, image_column, caption_column, src)


def _folder_records(root: Path) -> list[Record]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    records = []
    for path in images:
        text = path.with_suffix(".txt")
        caption = text.read_text("utf-8") if text.is_file() else None
        records.append(Record(str(path.relative_to(root)), path, caption))
    return records


def _pick_column(rows: list[dict], given: str | None, candidates: tuple[str, ...], what: str, src: Path) -> str:
    columns = list(rows[0]) if rows else []
    if given:
        if rows and given not in columns:
            raise ValueError(f"{src}: no column {given!r} — columns are {columns}")
        return given
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"{src}: no {what} column among {columns} — pass --{what}-column")


def _table_records(rows: list, root: Path, image_column: str | None, caption_column: str | None,
                   src: Path) -> list[Record]:
    if rows and not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{src}: every row must be an object with image and caption fields")
    image_key = _pick_column(rows, image_column, IMAGE_COLUMNS, "image", src)
    caption_key = _pick_column(rows, caption_column, CAPTION_COLUMNS, "caption", src)
    records = []
    for row in rows:
        where = str(row.get(image_key) or "")
        remote = "://" in where and not where.startswith("file://")
        path = None if remote or not where else root / where.removeprefix("file://")
        extra = {k: v for k, v in row.items() if k not in (image_key, caption_key) and isinstance(v, (str, int, float, bool))}
        caption = row.get(caption_key)
        records.append(Record(where, path, None if caption is None else str(caption), extra))
    return records


def encode_record(index: int, record: Record, options: EncodeOptions) -> Sample | tuple[str, str]:
    """Make the sample for one record, or (source, reason) when it must be skipped."""
    if record.path is None:
        return record.source, "remote url (download with img2dataset first)" if record.source else "no image path"
    if record.caption is None or not record.caption.strip():
        return record.source, "missing caption" if record.caption is None else "empty caption"
    if not record.path.is_file():
        return record.source, "missing file"
    raw = record.path.read_bytes()
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except Image.DecompressionBombError:
        return record.source, "image over pixel limit"
    except (OSError, ValueError, SyntaxError) as error:
        return record.source, f"unreadable or truncated image ({error})"
    return _build_sample(index, record, raw, image, options)


def _build_sample(index: int, record: Record, raw: bytes, image: Image.Image, options: EncodeOptions) -> Sample:
    source_format = _FORMATS.get(image.format or "")
    rotated = image.getexif().get(0x0112, 1) not in (None, 1)  # EXIF orientation tag
    upright = ImageOps.exif_transpose(image) if rotated else image
    width, height = upright.size
    scale = min(1.0, options.max_side / max(width, height)) if options.max_side else 1.0
    ext = options.image_format if options.image_format != "keep" else source_format
    if scale == 1.0 and not rotated and ext == source_format:
        data = raw  # already in the wanted format: copy bytes, no generation loss
    else:
        if scale < 1.0:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            upright = upright.resize(size, Image.LANCZOS, reducing_gap=3.0)
        ext = ext or ("png" if "A" in upright.getbands() or upright.mode == "P" else "jpg")
        data = _encode(upright, ext, options.quality)
    key = sample_key(index)
    caption = record.caption.strip()  # type: ignore[union-attr]
    meta = {**record.extra, "key": key, "source": record.source, "caption": caption,
            "width": round(width * scale), "height": round(height * scale),
            "original_width": width, "original_height": height}
    return Sample(key, {ext: data, "txt": caption.encode("utf-8"), "json": json.dumps(meta, sort_keys=True).encode("utf-8")})


def _encode(image: Image.Image, ext: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if ext == "png":
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    if image.mode not in ("RGB", "L"):
        rgba = image.convert("RGBA")  # flatten transparency onto white: JPEG has no alpha
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    image.save(buffer, format="JPEG" if ext == "jpg" else "WEBP", quality=quality)
    return buffer.getvalue()


def _encode_job(job: tuple[int, Record, EncodeOptions]) -> Sample | tuple[str, str]:
    return encode_record(*job)


@dataclass(frozen=True)
class ShardLimits:
    """When a shard is full: after this many samples, or before passing this many bytes."""

    samples_per_shard: int = 1000
    max_shard_bytes: int | None = None

    def full(self, count: int, nbytes: int, next_bytes: int) -> bool:
        if count == 0:
            return False
        if self.max_shard_bytes:
            return nbytes + next_bytes > self.max_shard_bytes
        return count >= self.samples_per_shard


def _tar_size(sample: Sample) -> int:
    return sum(512 + -(-len(data) // 512) * 512 for data in sample.members.values())


class MakeShardsError(ValueError):
    """An --out folder these shards cannot go to; the message is one line."""


def _resume(out: Path, options: dict) -> Manifest:
    """The manifest's intact prefix of shards when the options match; a fresh manifest otherwise.

    The same input with images added or removed is rebuilt whole: records are sorted, so a new image may
    land in any shard. Another input or other options are refused (the folder is someone else's shards).
    """
    old = read_manifest(out)
    if old is None:
        return Manifest(options=options)
    if {**old.options, "num_records": None} != {**options, "num_records": None}:
        raise MakeShardsError(f"{out} holds shards made from other input or options — pick a new --out or delete it")
    if old.options != options:
        print(f"the input now has {options['num_records']} records (was {old.options.get('num_records')}): "
              f"rebuilding the shards in {out}")
        for shard in old.shards:
            (out / shard.name).unlink(missing_ok=True)  # a smaller rebuild must leave no stale shard behind
        return Manifest(options=options)
    kept = []
    for shard in old.shards:
        path = out / shard.name
        if not path.is_file() or path.stat().st_size != shard.num_bytes:
            break  # everything from the first damaged shard on is rebuilt
        kept.append(shard)
    end = kept[-1].end_record if kept else 0
    skipped = [s for s in old.skipped if s["index"] < end]
    return Manifest(kept, skipped, old.complete and len(kept) == len(old.shards), options)


def _results(records: list[Record], start: int, options: EncodeOptions, workers: int) -> Iterator[tuple[int, Sample | tuple[str, str]]]:
    jobs = ((i, records[i], options) for i in range(start, len(records)))
    if workers <= 1:
        yield from ((i, _encode_job(job)) for i, job in zip(range(start, len(records)), jobs))
        return
    # imap keeps input order, so output bytes do not depend on the number of workers.
    with Pool(workers) as pool:
        yield from zip(range(start, len(records)), pool.imap(_encode_job, jobs, chunksize=4))


def make_shards(src: Path, out: Path, *, image_root: Path | None = None, image_column: str | None = None,
                caption_column: str | None = None, limits: ShardLimits = ShardLimits(),
                options: EncodeOptions = EncodeOptions(), workers: int = 1) -> Manifest:
    """Write shards for every readable record of `src` into `out`; resumes a previous run."""
    records = read_records(src, image_root, image_column, caption_column)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"input": str(src.resolve()), "image_root": str(image_root.resolve()) if image_root else None,
                "num_records": len(records), "format": options.image_format, "max_side": options.max_side,
                "quality": options.quality, "samples_per_shard": limits.samples_per_shard,
                "max_shard_bytes": limits.max_shard_bytes, "columns": [image_column, caption_column]}
    manifest = _resume(out, settings)
    start = manifest.shards[-1].end_record if manifest.shards else 0
    if manifest.complete:
        return manifest
    pending: list[Sample] = []
    pending_bytes, first = 0, start
    results = tqdm(_results(records, start, options, workers), total=len(records), initial=start, desc="shards", unit="img")
    for index, result in results:
        if isinstance(result, tuple):
            manifest.skipped.append({"index": index, "source": result[0], "reason": result[1]})
            continue
        size = _tar_size(result)
        if limits.full(len(pending), pending_bytes, size):
            _flush(out, manifest, pending, first, index)
            pending, pending_bytes, first = [], 0, index
        pending.append(result)
        pending_bytes += size
    if pending:
        _flush(out, manifest, pending, first, len(records))
    manifest.complete = True
    write_manifest(out, manifest)
    return manifest


def _flush(out: Path, manifest: Manifest, samples: list[Sample], first: int, end: int) -> None:
    name = shard_name(len(manifest.shards))
    nbytes = write_shard(out / name, samples)
    manifest.shards.append(ShardRecord(name, len(samples), nbytes, first, end))
    write_manifest(out, manifest)  # after every shard, so an interrupted run resumes here


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: make shards, then list every skipped input."""
    parser = argparse.ArgumentParser(prog="python -m data_tools.make_shards",
                                     description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--input", required=True, type=Path, help="image folder, .jsonl, .csv or tutorial .json")
    parser.add_argument("--out", required=True, type=Path, help="folder for the shards and manifest.json")
    parser.add_argument("--image-root", type=Path, help="folder image paths are relative to (default: the input's folder)")
    parser.add_argument("--image-column", help=f"default: first of {', '.join(IMAGE_COLUMNS)}")
    parser.add_argument("--caption-column", help=f"default: first of {', '.join(CAPTION_COLUMNS)}")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard")
    size.add_argument("--max-shard-bytes", type=int, help="start a new shard before passing this size")
    parser.add_argument("--max-side", type=int, help="downscale so the longer side is at most this")
    parser.add_argument("--format", choices=["jpg", "png", "webp", "keep"], default="keep",
                        help="keep = copy JPEG/PNG/WebP bytes unchanged when no resize is needed")
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image-encoding processes")
    args = parser.parse_args(argv)
    try:
        make_output_dir(args.out, f"--out {args.out}")
        manifest = make_shards(args.input, args.out, image_root=args.image_root, image_column=args.image_column,
                               caption_column=args.caption_column,
                               limits=ShardLimits(args.samples_per_shard, args.max_shard_bytes),
                               options=EncodeOptions(args.format, args.max_side, args.quality), workers=args.workers)
    except (MakeShardsError, OutputPathError) as err:  # OutputPathError: --out a file, a device, /proc; full disk
        print(f"error: {err}", file=sys.stderr)
        return 2
    for skip in manifest.skipped:
        print(f"skipped {skip['source']}: {skip['reason']}")
    shards = len(manifest.shards)
    print(f"{manifest.num_samples} samples in {shards} shard{'s' * (shards != 1)}, {len(manifest.skipped)} skipped → {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
