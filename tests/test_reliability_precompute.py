"""data_tools.precompute: every bad argument, base or --out is one line (exit 2) before anything loads; a cache
of nothing fails; a mismatch names the setting; a failed start never blocks its folder; a killed re-run of a
finished cache keeps its sample counts.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from data_tools import precompute
from data_tools.shards import MANIFEST_NAME, Sample, read_manifest, write_shard


def run(model_dir: str, shards: str, out: Path, *extra: str) -> int:
    return precompute.main(["--base", model_dir, "--shards", f"{shards}/*.tar", "--out", str(out), "--resolution", "64",
                            "--batch-size", "2", "--dtype", "fp32", *extra])


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize("extra, needle", [
    (["--batch-size", "0"], "--batch-size must be ≥ 1"),
    (["--resolution", "0"], "--resolution must be ≥ 8"),
    (["--resolution", "-64"], "--resolution must be ≥ 8"),
    (["--resolution", "7"], "--resolution must be ≥ 8"),
    (["--reference-views", "-1"], "--reference-views must be ≥ 0"),
    (["--reference-shuffle-grid", "0"], "--reference-shuffle-grid must be ≥ 1"),
    (["--max-image-pixels", "0"], "--max-image-pixels must be ≥ 1"),
    (["--reference-crop", "0.5", "0.2"], "--reference-crop"),
])
def test_bad_numbers_are_one_line_before_loading(tmp_path, capsys, monkeypatch, extra, needle):
    monkeypatch.setattr(precompute, "load_encoders", lambda *a, **k: pytest.fail("loaded the base"))
    assert run("unused", str(tmp_path), tmp_path / "cache", *extra) == 2
    assert needle in one_line(capsys)


def test_out_that_is_a_file_or_under_proc_is_one_line(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(precompute, "load_encoders", lambda *a, **k: pytest.fail("loaded the base"))
    (tmp_path / "file").write_text("x")
    assert run("unused", shards, tmp_path / "file") == 2
    assert "is a file" in one_line(capsys)
    assert run("unused", shards, Path("/proc/cache")) == 2
    assert "under /proc" in one_line(capsys)


def test_a_missing_base_or_a_flux_base_with_plus_is_one_line(shards, tmp_path, capsys):
    from data_tools.make_tiny_flux import save_tiny_flux

    assert run(str(tmp_path / "nowhere"), shards, tmp_path / "a") == 2
    assert "nowhere" in one_line(capsys)
    flux = save_tiny_flux(tmp_path / "flux", seed=0)
    capsys.readouterr()
    assert run(str(flux), shards, tmp_path / "b", "--adapter-type", "ip_adapter_plus") == 2
    assert "FLUX adapters read image_embeds" in one_line(capsys)


def test_a_cache_of_no_sample_fails(tiny_model_dir, tmp_path, capsys):
    source = tmp_path / "bad"
    source.mkdir()
    write_shard(source / "000.tar", [Sample("a", {"txt": b"a caption without an image"})])
    assert run(tiny_model_dir, str(source), tmp_path / "cache") == 2
    assert "no sample" in capsys.readouterr().err


@pytest.fixture(scope="module")
def finished(tiny_model_dir, shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("precompute") / "cache"
    assert run(tiny_model_dir, shards, out) == 0
    return out


def test_a_mismatch_names_the_setting(tiny_model_dir, shards, finished, capsys):
    assert run(tiny_model_dir, shards, finished, "--dtype", "bf16") == 2
    line = one_line(capsys)
    assert "dtype: cache 'fp32', this run 'bf16'" in line and "(True)" not in line


def test_a_failed_start_does_not_block_its_folder(tiny_model_dir, shards, finished, tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    manifest = json.loads((finished / MANIFEST_NAME).read_text())
    manifest["options"]["cache"]["dtype"] = "bf16"  # a start with other settings that failed before any shard
    (out / MANIFEST_NAME).write_text(json.dumps({**manifest, "complete": False, "shards": []}))
    assert run(tiny_model_dir, shards, out) == 0
    assert read_manifest(out).complete


def test_a_killed_rerun_of_a_finished_cache_keeps_its_counts(tiny_model_dir, shards, finished, monkeypatch):
    before = (finished / MANIFEST_NAME).read_bytes()

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(precompute, "finish_cache", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, shards, finished)
    assert (finished / MANIFEST_NAME).read_bytes() == before and read_manifest(finished).num_samples == 32


def test_shards_are_never_written_over_a_device_or_through_a_symlink(tmp_path):
    from instantstyle.errors import OutputPathError

    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "000.tar").symlink_to(victim)
    with pytest.raises(OutputPathError, match="symlink"):
        write_shard(tmp_path / "000.tar", [Sample("a", {"txt": b"x"})])
    assert victim.read_text() == "keep" and stat.S_ISLNK((tmp_path / "000.tar").lstat().st_mode)
