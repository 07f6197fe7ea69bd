"""make_shards: every input format, bad inputs, downscaling, determinism, resume; inspect passes on output."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data_tools.make_shards as ms
from data_tools import check_shards
from data_tools.shards import read_manifest


def save_image(path: Path, size: tuple[int, int], fmt: str, seed: int = 0, mode: str = "RGB") -> None:
    channels = 4 if mode == "RGBA" else 3
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path, format=fmt)


@pytest.fixture()
def images(tmp_path) -> Path:
    """7 images: 4 good (jpg, png with alpha, webp, nested jpg), 3 bad; captions as sidecar .txt."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    save_image(root / "a.jpg", (60, 40), "JPEG", 1)
    save_image(root / "b.png", (30, 50), "PNG", 2, "RGBA")
    save_image(root / "c.webp", (40, 40), "WEBP", 3)
    save_image(root / "sub" / "d.jpg", (48, 32), "JPEG", 4)
    save_image(root / "e.jpg", (32, 32), "JPEG", 5)  # no caption file
    save_image(root / "f.jpg", (32, 32), "JPEG", 6)  # empty caption
    (root / "g.jpg").write_bytes((root / "a.jpg").read_bytes()[:200])  # truncated
    for name, text in [("a", "a red fox"), ("b", "a blue bird"), ("c", "a cat"), ("sub/d", "a dog"), ("f", "  "), ("g", "cut")]:
        (root / f"{name}.txt").write_text(text)
    return root


def shard_members(out: Path) -> dict[str, bytes]:
    members = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return members


def metas(out: Path) -> list[dict]:
    return [json.loads(v) for k, v in sorted(shard_members(out).items()) if k.endswith(".json")]


def check_output(out: Path, expected_sources: list[str], expected_skips: dict[str, str]) -> None:
    manifest = read_manifest(out)
    assert manifest.complete and manifest.num_samples == len(expected_sources)
    assert {s["source"]: s["reason"].split(" (")[0] for s in manifest.skipped} == expected_skips
    assert [m["source"] for m in metas(out)] == expected_sources
    assert check_shards.main([str(out)]) == 0


def test_folder_with_sidecar_captions(images, tmp_path, capsys):
    out = tmp_path / "out"
    ms.make_shards(images, out, limits=ms.ShardLimits(samples_per_shard=3))
    check_output(out, ["a.jpg", "b.png", "c.webp", "sub/d.jpg"],
                 {"e.jpg": "missing caption", "f.jpg": "empty caption", "g.jpg": "unreadable or truncated image"})
    members = shard_members(out)
    # Keys are record indices in sorted path order (a, b, c, e, f, g, sub/d): skipped ones leave gaps.
    assert sorted(members) == sorted(f"00000000{i}.{ext}" for i, exts in
                                     [(0, "jpg txt json"), (1, "png txt json"), (2, "webp txt json"), (6, "jpg txt json")]
                                     for ext in exts.split())
    assert members["000000000.jpg"] == (images / "a.jpg").read_bytes()  # kept unchanged
    assert members["000000001.txt"] == b"a blue bird"
    meta = json.loads(members["000000000.json"])
    assert (meta["width"], meta["height"], meta["original_width"], meta["original_height"]) == (60, 40, 60, 40)
    assert [s.num_samples for s in read_manifest(out).shards] == [3, 1]
    assert "BAD" not in capsys.readouterr().out


def test_jsonl_csv_and_tutorial_json(images, tmp_path):
    rows = [{"image": "a.jpg", "caption": "a red fox", "license": "cc0"}, {"image": "missing.jpg", "caption": "gone"},
            {"image": "c.webp", "caption": ""}, {"image": "https://example.com/x.jpg", "caption": "remote"},
            {"image": "sub/d.jpg", "caption": "a dog"}]
    jsonl = images / "list.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    ms.make_shards(jsonl, tmp_path / "jsonl")
    skips = {"missing.jpg": "missing file", "c.webp": "empty caption", "https://example.com/x.jpg": "remote url"}
    check_output(tmp_path / "jsonl", ["a.jpg", "sub/d.jpg"], skips)
    assert metas(tmp_path / "jsonl")[0]["license"] == "cc0"

    table = tmp_path / "list.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, ["file_name", "text"])
        writer.writeheader()
        writer.writerows([{"file_name": "b.png", "text": "a blue bird"}, {"file_name": "g.jpg", "text": "cut"}])
    ms.make_shards(table, tmp_path / "csv", image_root=images)
    check_output(tmp_path / "csv", ["b.png"], {"g.jpg": "unreadable or truncated image"})

    tutorial = tmp_path / "data.json"
    tutorial.write_text(json.dumps([{"image_file": "c.webp", "text": "a cat"}, {"image_file": "a.jpg", "text": "fox"}]))
    ms.make_shards(tutorial, tmp_path / "tutorial", image_root=images)
    check_output(tmp_path / "tutorial", ["c.webp", "a.jpg"], {})
    with pytest.raises(ValueError, match="no caption column"):
        ms.read_records(_write(tmp_path / "x.jsonl", '{"image": "a.jpg", "alt": "?"}'))
    assert [r.caption for r in ms.read_records(_write(tmp_path / "y.jsonl", '{"path": "a.jpg", "alt": "?"}'),
                                               caption_column="alt")] == ["?"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_max_side_and_format_conversion(images, tmp_path):
    out = tmp_path / "out"
    ms.make_shards(images, out, options=ms.EncodeOptions(image_format="jpg", max_side=30))
    members = shard_members(out)
    assert sorted(k for k in members if not k.endswith(("txt", "json"))) == [f"00000000{i}.jpg" for i in (0, 1, 2, 6)]
    first = Image.open(io.BytesIO(members["000000000.jpg"]))
    meta = json.loads(members["000000000.json"])
    assert first.size == (30, 20) and (meta["width"], meta["height"]) == (30, 20)
    assert (meta["original_width"], meta["original_height"]) == (60, 40)
    transparent = Image.open(io.BytesIO(members["000000001.jpg"]))
    assert transparent.mode == "RGB" and transparent.size == (18, 30)
    assert check_shards.main([str(out)]) == 0


def test_deterministic_bytes_across_runs_and_workers(images, tmp_path):
    ms.make_shards(images, tmp_path / "one", limits=ms.ShardLimits(samples_per_shard=2), workers=1)
    ms.make_shards(images, tmp_path / "two", limits=ms.ShardLimits(samples_per_shard=2), workers=2)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == ["00000.tar", "00001.tar", "manifest.json"]
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)


def test_resume_skips_finished_shards(images, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    ms.make_shards(images, reference, limits=ms.ShardLimits(samples_per_shard=1))
    out, written = tmp_path / "out", []
    real_write = ms.write_shard

    def crash_after_two(path, samples):
        if len(written) == 2:
            raise KeyboardInterrupt  # the run dies while making the third shard
        written.append(path.name)
        return real_write(path, samples)

    monkeypatch.setattr(ms, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        ms.make_shards(images, out, limits=ms.ShardLimits(samples_per_shard=1))
    assert not read_manifest(out).complete and len(read_manifest(out).shards) == 2
    written.clear()
    monkeypatch.setattr(ms, "write_shard", lambda path, samples: written.append(path.name) or real_write(path, samples))
    ms.make_shards(images, out, limits=ms.ShardLimits(samples_per_shard=1))
    assert written == ["00002.tar", "00003.tar"]
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in reference.iterdir())
    written.clear()
    ms.make_shards(images, out, limits=ms.ShardLimits(samples_per_shard=1))
    assert written == []  # complete: nothing redone
    with pytest.raises(ms.MakeShardsError, match="other input or options"):
        ms.make_shards(images, out, limits=ms.ShardLimits(samples_per_shard=2))


def test_a_rerun_after_images_were_added_or_removed_rebuilds_the_shards(images, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--input", str(images), "--out", str(out), "--samples-per-shard", "1", "--workers", "1"]
    assert ms.main(args) == 0 and read_manifest(out).num_samples == 4
    Image.new("RGB", (40, 30), "red").save(images / "aaa_new.png")  # sorts first: every shard moves
    (images / "aaa_new.txt").write_text("a red square")
    assert ms.main(args) == 0
    assert read_manifest(out).num_samples == 5 and len(list(out.glob("*.tar"))) == 5
    for name in ("aaa_new.png", "a.jpg"):
        (images / name).unlink(missing_ok=True)
    assert ms.main(args) == 0
    assert read_manifest(out).num_samples == len(list(out.glob("*.tar"))) == 3  # no stale shard left behind
    assert "rebuilding the shards" in capsys.readouterr().out


def test_another_input_into_the_same_out_is_one_error_line(images, tmp_path, capsys):
    out = tmp_path / "out"
    assert ms.main(["--input", str(images), "--out", str(out), "--workers", "1"]) == 0
    assert ms.main(["--input", str(images), "--out", str(out), "--workers", "1", "--samples-per-shard", "2"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {out} holds shards made from other input or options — pick a new --out or delete it")


def test_max_shard_bytes_limits_shard_size(images, tmp_path):
    out = tmp_path / "out"
    assert ms.main(["--input", str(images), "--out", str(out), "--max-shard-bytes", "9000", "--workers", "1"]) == 0
    shards = read_manifest(out).shards
    assert len(shards) >= 2 and sum(s.num_samples for s in shards) == 4
    assert all(s.num_bytes <= 9000 + 10240 for s in shards)  # limit on members; tar end padding on top
