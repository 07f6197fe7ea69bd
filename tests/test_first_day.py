"""The first day with your own data: presets at their own size, buckets said at start, caches that set their
own sizes, shards from any tool, a folder where shards are asked for."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from data_tools import make_manifest
from data_tools.shards import Manifest, Sample, ShardRecord, read_manifest, write_manifest, write_shard
from tests.helpers import tiny_overrides
from train.cache_settings import cache_adapter_choice
from train.checks import check_data
from train.config import ConfigError, DataConfig, compose, section


@pytest.mark.parametrize("preset, resolution", [("tiny", 64), ("toy", 64), ("sd15", 512), ("sdxl", 1024)])
def test_each_base_preset_trains_at_the_size_it_was_made_for(preset, resolution):
    assert compose(["data.shards=x.tar", f"model={preset}"]).data.resolution == resolution
    assert compose(["data.shards=x.tar", f"model={preset}", "data.resolution=128"]).data.resolution == 128


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def image_shards(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    folder.mkdir(parents=True)
    write_shard(folder / "00000.tar", [Sample(f"{i:04d}", {"png": png(*s), "txt": b"a cat"}) for i, s in enumerate(sizes)])
    return folder


def test_buckets_are_logged_at_start_with_where_the_images_fall(tmp_path, caplog):
    folder = image_shards(tmp_path / "wide", [(512, 256)] * 3 + [(256, 256)])
    data = compose([f"data.shards={folder}", "data.resolution=512", "data.buckets=sdxl", "data.num_workers=0"]).data
    with caplog.at_level(logging.INFO, logger="train"):
        check_data(data)
    text = caplog.text
    assert "11 buckets; the first 4 images of 00000.tar fall in:" in text
    assert "768×320   (2.40): 3" in text and "512×512   (1.00): 1" in text


def test_a_bucket_set_that_collapses_to_one_square_is_said_in_one_line(tmp_path, caplog):
    folder = image_shards(tmp_path / "small", [(64, 32)])
    data = compose([f"data.shards={folder}", "model=tiny", "data.buckets=sdxl", "data.num_workers=0"]).data
    with caplog.at_level(logging.INFO, logger="train"):
        check_data(data)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["data.buckets=sdxl at data.resolution=64 is the one bucket 64x64 (sides are multiples of 64): "
                        "every image trains square, as with data.buckets=none; data.resolution=512 gives 11 buckets, "
                        "1024 the published 41"]


def test_sdxl_buckets_below_64_px_are_refused_in_one_line(tmp_path):
    # The rule's sides are multiples of 64: at 32 px the set was empty and the loader died in min().
    from data_tools.buckets import parse_buckets

    folder = image_shards(tmp_path / "tiny", [(64, 32)])
    data = compose([f"data.shards={folder}", "model=tiny", "data.resolution=32", "data.buckets=sdxl"]).data
    with pytest.raises(ConfigError, match=r"data.buckets=sdxl needs data.resolution ≥ 64, .*\(got 32\): "
                                          r"use data.buckets=none"):
        check_data(data)
    with pytest.raises(ValueError, match="needs a resolution ≥ 64"):
        parse_buckets("sdxl", 32)


def fake_cache(folder: Path, **identity) -> Path:
    """A folder whose manifest says what made the cache (the settings data=cached reads from it)."""
    folder.mkdir(parents=True)
    (folder / "00000.tar").write_bytes(b"")
    made = {"format": "instantstyle-embedding-cache", "resolution": 512, "buckets": [[512, 512], [576, 448]],
            "clip_image_size": 64, "adapter_type": "ip_adapter_plus", **identity}
    write_manifest(folder, Manifest([ShardRecord("00000.tar", 1, 0)], complete=True, options={"cache": made}))
    return folder


def test_a_cached_run_takes_its_sizes_from_the_cache(tmp_path):
    cache = fake_cache(tmp_path / "cache")
    data = section(compose(["data=cached", f"data.shards={cache}"]).data, "data", DataConfig)
    assert (data.resolution, data.buckets, data.clip_image_size) == (512, [[512, 512], [576, 448]], 64)
    # also over the preset's own size (model=tiny says 64 px) ...
    assert compose(["model=tiny", "data=cached", f"data.shards={cache}/*.tar"]).data.resolution == 512
    # ... while a value typed on the command line stays, for check_cache to refuse in one line
    assert compose(["data=cached", f"data.shards={cache}", "data.resolution=256"]).data.resolution == 256
    unbucketed = fake_cache(tmp_path / "square", buckets=None)
    assert compose(["data=cached", f"data.shards={unbucketed}"]).data.buckets == "none"


def test_a_cached_run_picks_the_adapter_the_cache_was_made_for(tmp_path):
    cache = str(fake_cache(tmp_path / "cache"))  # made for ip_adapter_plus
    assert cache_adapter_choice(["data=cached", f"data.shards={cache}"], True, cache, "ip_adapter") == [
        "adapter=ip_adapter_plus"]
    for explicit in ("adapter=ip_adapter", "adapter.type=ip_adapter"):  # typed: check_cache refuses it instead
        assert cache_adapter_choice([explicit], True, cache, "ip_adapter") == []
    assert cache_adapter_choice([], False, cache, "ip_adapter") == []  # live data: nothing implied
    assert cache_adapter_choice([], True, cache, "ip_adapter_plus") == []


def test_python_m_train_adds_the_caches_adapter_choice(tmp_path, capsys):
    from train.preflight import precheck

    cache = fake_cache(tmp_path / "cache")  # made for ip_adapter_plus
    assert precheck(["data=cached", f"data.shards={cache}"]) == ["adapter=ip_adapter_plus"]
    assert capsys.readouterr().out == "data=cached: the cache was made for adapter=ip_adapter_plus, so training uses it\n"
    assert precheck(["data=cached", f"data.shards={cache}", "adapter=ip_adapter"]) == []


def test_a_folder_of_shards_is_accepted_as_data_shards(tmp_path, shards):
    data, urls = check_data(compose([f"data.shards={shards}", "data.num_workers=0"]).data)
    assert [Path(u).name for u in urls] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]


def test_a_folder_of_images_is_answered_with_the_command_that_makes_shards(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(png(8, 8))
    with pytest.raises(ConfigError) as err:
        check_data(compose([f"data.shards={photos}"]).data)
    assert str(err.value) == (f"data.shards={photos} holds images, not shards: python -m data_tools.make_shards "
                              f"--input {photos} --out {photos}-shards (captions from each image's .txt), then "
                              f"data.shards={photos}-shards")


def test_make_manifest_counts_shards_any_tool_wrote(tmp_path, shards, capsys):
    folder = tmp_path / "foreign"
    shutil.copytree(shards, folder)
    expected = {s.name: s.num_samples for s in read_manifest(folder).shards}
    (folder / "manifest.json").unlink()  # shards from another tool come without one
    assert make_manifest.main([str(folder)]) == 0
    assert {s.name: s.num_samples for s in read_manifest(folder).shards} == expected
    assert capsys.readouterr().out.strip() == f"wrote {folder.resolve()}/manifest.json: 32 samples in 4 shards"


def test_make_manifest_refuses_a_damaged_shard_and_a_cache(tmp_path, shards, capsys):
    folder = tmp_path / "damaged"
    shutil.copytree(shards, folder)
    data = (folder / "00001.tar").read_bytes()
    (folder / "00001.tar").write_bytes(data[: len(data) // 2])
    assert make_manifest.main([f"{folder}/*.tar"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(f"error: {folder}/00001.tar is damaged after "), errors
    cache = fake_cache(tmp_path / "cache")
    assert make_manifest.main([str(cache)]) == 2
    assert "holds an embedding cache" in capsys.readouterr().err


def test_the_run_log_holds_every_window_and_ends_with_the_export(tiny_model_dir, shards, tmp_path, monkeypatch,
                                                                  caplog):
    """Under a progress bar too (a terminal), whatever the logger: loss, grad norm, data wait, skips, ETA."""
    from train.training import train

    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    cfg = compose(tiny_overrides(tiny_model_dir, shards, tmp_path / "run", "trainer.max_steps=4",
                                 "trainer.log_every=2", "trainer.checkpoint_every=0", "logger=none"))
    with caplog.at_level(logging.INFO):
        train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("train")]
    windows = [line for line in lines if line.startswith("step ")]
    assert [w.split(" loss ")[0] for w in windows] == ["step 2/4", "step 4/4"]
    for window in windows:
        assert " grad norm " in window and " samples/s, data wait " in window
        assert "| skipped 0 samples, 0 steps | ETA " in window
    assert windows[-1].endswith("ETA 0s")
    assert lines[-1] == f"done: step 4, exported {tmp_path / 'run' / 'ip-adapter.safetensors'}"


@pytest.mark.parametrize("seconds, text", [(4.4, "4s"), (253, "4m 13s"), (7500, "2h 05m")])
def test_eta_reads_as_a_duration(seconds, text):
    from train.loggers import format_duration

    assert format_duration(seconds) == text


def test_window_lines_stay_off_the_console_under_a_progress_bar():
    from train.loggers import FILE_ONLY, keep_window_lines_off_console

    console, file = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(console), logging.FileHandler("/dev/null")]
    handlers[1].setStream(file)
    root = logging.getLogger()
    for h in handlers:
        root.addHandler(h)
    try:
        keep_window_lines_off_console()
        logging.getLogger("train.loop").warning("step 2/4 loss 0.1", extra={FILE_ONLY: True})
    finally:
        for h in handlers:
            root.removeHandler(h)
    assert console.getvalue() == "" and file.getvalue() == "step 2/4 loss 0.1\n"


@pytest.mark.parametrize("module", ["instantstyle.generate", "instantstyle.evaluate", "instantstyle.probe_blocks",
                                    "data_tools.synthetic", "data_tools.make_shards", "data_tools.check_shards",
                                    "data_tools.make_manifest", "data_tools.precompute", "data_tools.make_tiny_model",
                                    "train.export", "train.sweep"])
def test_help_names_the_command_to_type(module, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(module).main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: python -m {module} ")


def test_style_references_alone_sample_images_with_each_checkpoint_and_at_the_end():
    from types import SimpleNamespace

    from train.config import TrainerConfig, ValidationConfig
    from train.loop import validation_due

    def due(validation: ValidationConfig) -> list[int]:
        trainer = TrainerConfig(checkpoint_every=5, max_steps=12)
        return [s for s in range(1, 13) if validation_due(SimpleNamespace(validation=validation, trainer=trainer, step=s))]

    assert due(ValidationConfig(styles="styles/", prompts=["a cat"])) == [5, 10, 12]  # no validation.every needed
    assert due(ValidationConfig(styles="styles/", prompts=["a cat"], every=4)) == [4, 8, 12]
    assert due(ValidationConfig()) == []  # no references: nothing to sample


def test_a_toy_cache_is_checked_against_the_toy_base_from_any_folder(tmp_path, monkeypatch):
    """model=toy names data_tools/toy_base relative to the package; precompute recorded where it resolved."""
    import train.cached_data
    from instantstyle.models import locate_base
    from train.checks import check_config

    cache = fake_cache(tmp_path / "cache", resolution=64, buckets=None, adapter_type="ip_adapter")
    seen = {}

    def fake_check_cache(data, urls, *, model_path, **_identity):
        seen["model_path"] = model_path
        raise ConfigError("stop here")

    monkeypatch.setattr(train.cached_data, "check_cache", fake_check_cache)
    monkeypatch.chdir(tmp_path)  # not the repository: data_tools/toy_base is not here
    with pytest.raises(ConfigError, match="stop here"):
        check_config(compose(["model=toy", "data=cached", f"data.shards={cache}", f"output_dir={tmp_path}/run"]))
    assert seen["model_path"] == locate_base("data_tools/toy_base") and Path(seen["model_path"]).is_absolute()