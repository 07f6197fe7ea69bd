"""inspect: passes clean shards, names every bad sample and truncated shard, one-line error on no match."""

from __future__ import annotations

import tarfile

import pytest

from data_tools import check_shards
from data_tools.shards import Sample, tar_bytes
from data_tools.synthetic import write_synthetic_shards


def read_samples(path) -> list[Sample]:
    samples: dict[str, Sample] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, Sample(key, {})).members[ext] = tar.extractfile(member).read()
    return list(samples.values())


def test_clean_shards_pass(tmp_path, capsys):
    write_synthetic_shards(tmp_path, num=12, size=32, seed=0, per_shard=5)
    assert check_shards.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "00002.tar                       2     0" in out and "total                          12     0" in out
    assert "< 256: 12" in out and "all samples decode" in out
    # Square synthetic images all fall in SDXL's square bucket.
    assert "SDXL aspect buckets" in out and " 1024×1024  (1.00): 12" in out


def test_corrupted_samples_and_truncated_tar_fail_with_names(tmp_path, capsys):
    write_synthetic_shards(tmp_path, num=10, size=32, seed=0, per_shard=5)
    samples = read_samples(tmp_path / "00000.tar")
    samples[1].members["png"] = samples[1].members["png"][: len(samples[1].members["png"]) // 2]
    samples[2].members["png"] = b"not an image at all"
    samples[3].members["json"] = b"{broken"
    samples[4].members["pyd"] = b"\x80\x04K\x01."
    (tmp_path / "00000.tar").write_bytes(tar_bytes(samples))
    whole = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(whole[: len(whole) // 2])
    assert check_shards.main([str(tmp_path / "*.tar")]) == 1
    out = capsys.readouterr().out
    assert "BAD 00000.tar 000000001: truncated image" in out
    assert "BAD 00000.tar 000000002: undecodable image" in out
    assert "BAD 00000.tar 000000003: bad json" in out
    assert "BAD 00000.tar 000000004: pickle-capable member" in out
    assert "BAD 00001.tar -: truncated or unreadable tar" in out
    assert "5 bad" in out


def test_manifest_count_mismatch_is_bad(tmp_path, capsys):
    write_synthetic_shards(tmp_path, num=6, size=32, seed=0, per_shard=3)
    samples = read_samples(tmp_path / "00001.tar")
    (tmp_path / "00001.tar").write_bytes(tar_bytes(samples[:2]))  # a sample went missing
    assert check_shards.main([str(tmp_path / "{00000..00001}.tar")]) == 1
    assert "manifest says 3 samples, shard has 2" in capsys.readouterr().out


def test_no_match_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as error:
        check_shards.main([str(tmp_path / "none*.tar")])
    assert "matches no shards" in str(error.value) and "\n" not in str(error.value)


def test_files_that_are_not_tars_are_bad_shards_not_crashes(tmp_path, capsys):
    import gzip

    write_synthetic_shards(tmp_path, num=4, size=32, seed=0, per_shard=4)
    good = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(bytes(range(256)) * 8)  # random-looking bytes
    (tmp_path / "00002.tar").write_bytes(b"a caption, not a shard\n" * 50)
    (tmp_path / "00003.tar").write_bytes(gzip.compress(good, mtime=0))
    header = bytearray(good)  # a valid checksum over a size field that is not octal
    header[124:136] = b"9z9z9z9z9z9\0"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    (tmp_path / "00004.tar").write_bytes(bytes(header))
    assert check_shards.main([str(tmp_path / "*.tar")]) == 1
    out = capsys.readouterr().out
    for shard in ("00001", "00002", "00003", "00004"):
        assert f"BAD {shard}.tar -: not a tar" in out
    assert "00000.tar                       4     0" in out and "4 bad" in out


def test_conditioning_metadata_out_of_range_is_reported(tmp_path, capsys):
    write_synthetic_shards(tmp_path, num=3, size=32, seed=0, per_shard=3)
    samples = read_samples(tmp_path / "00000.tar")
    samples[0].members["json"] = b'{"original_height": 100000000000000000000000, "original_width": 64}'
    samples[1].members["json"] = b'{"original_height": 64, "original_width": -1}'
    (tmp_path / "00000.tar").write_bytes(tar_bytes(samples))
    assert check_shards.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "BAD 00000.tar 000000000: bad metadata: original_height=" in out
    assert "BAD 00000.tar 000000001: bad metadata: original_width=-1" in out and "2 bad" in out
