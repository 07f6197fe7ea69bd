"""Inputs the loader meets in the wild: turned, 16-bit and animated images; shard paths that are no shards."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.embedding_cache import CACHE_FORMAT
from data_tools.decode import decode_rgb, image_member, open_image
from data_tools.shards import Manifest, Sample, write_manifest, write_shard
from tests.test_data_loader import good_sample
from train.preflight import quote_shards
from train.checks import check_data
from train.config import ConfigError, DataConfig, compose, section
from train.data import NoUsableData, build_train_loader, decode_sample
from data_tools.shards import RawSample


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def stored_turned(upright: Image.Image, fmt: str = "PNG") -> bytes:
    """`upright` stored turned on its side with EXIF orientation 6 (what a phone camera writes)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    return encoded(upright.transpose(Image.Transpose.ROTATE_90), fmt, exif=exif.tobytes())


def cfg(**overrides) -> DataConfig:
    return section({"shards": "x", "resolution": 64, "clip_image_size": 16, "drop_image_prob": 0, "drop_text_prob": 0,
                    "drop_both_prob": 0, **overrides}, "data", DataConfig)


def decoded(image_bytes: bytes, ext: str = "png", **overrides) -> dict:
    raw = RawSample("k", "s.tar", {ext: image_bytes, "txt": b"a caption"})
    return decode_sample(raw, cfg(**overrides), np.random.default_rng(0))


def portrait() -> Image.Image:
    y, x = np.mgrid[0:96, 0:48]
    pixels = np.stack([y * 2.6, x * 5.3, (y < 30) * 200.0], axis=-1).astype(np.uint8)  # smooth: JPEG keeps it
    return Image.fromarray(pixels)  # 48 wide, 96 high, darker at the top


def test_an_exif_turned_image_trains_upright_in_its_own_bucket():
    buckets = [[64, 64], [48, 96], [96, 48]]  # square, portrait, landscape
    upright = decoded(encoded(portrait(), "PNG"), buckets=buckets)
    turned = decoded(stored_turned(portrait()), buckets=buckets)
    assert upright["bucket"] == turned["bucket"] == (48, 96)
    assert np.array_equal(turned["pixels"], upright["pixels"]) and turned["original_size"] == (96, 48)
    jpeg = decoded(stored_turned(portrait(), "JPEG"), ext="jpg", buckets=buckets)  # decoded in draft mode
    assert jpeg["bucket"] == (48, 96) and jpeg["pixels"].shape == (96, 48, 3)
    assert np.abs(jpeg["pixels"].astype(int) - upright["pixels"]).mean() < 8  # upright, not a turned image


def test_a_16_bit_grey_png_keeps_its_tones():
    grey = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 31).astype(np.uint16)
    image = decode_rgb(open_image(encoded(Image.fromarray(grey), "PNG"), 10**8))
    assert np.array_equal(np.asarray(image)[..., 0], (grey >> 8).astype(np.uint8))


def test_an_animated_gif_trains_on_its_first_frame():
    frames = [Image.new("RGB", (64, 64), colour) for colour in ((200, 0, 0), (0, 0, 200))]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert image_member({"gif": gif, "txt": b"x"}) == gif
    pixels = decoded(gif, ext="gif")["pixels"]
    assert abs(int(pixels[..., 0].mean()) - 200) < 5 and pixels[..., 2].mean() < 5


def _data_error(spec) -> str:
    with pytest.raises(ConfigError) as err:
        check_data(compose(["model.path=/m", "output_dir=/o", *quote_shards([f"data.shards={spec}"])]).data)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_shard_paths_that_are_no_shards_are_one_line(tmp_path):
    (tmp_path / "folder.tar").mkdir()
    assert "is a folder, not a tar shard" in _data_error(tmp_path / "folder.tar")
    for device in ("/dev/null", "/dev/zero", "/dev/urandom"):
        assert f"{device} is not a regular file" in _data_error(device)
    assert "ünïcode/x.tar does not exist" in _data_error(tmp_path / "ünïcode" / "x.tar")


def test_a_brace_pattern_or_unicode_path_given_bare_names_the_missing_shard(tmp_path):
    folder = tmp_path / "ünï"
    folder.mkdir()
    write_shard(folder / "00000.tar", [good_sample(0)])
    assert f"{folder}/00001.tar does not exist (2 of 3" in _data_error(f"{folder}/{{00000..00002}}.tar")
    data = compose(["model.path=/m", "output_dir=/o", *quote_shards([f"data.shards={folder}/00000.tar"])]).data
    assert check_data(data)[1] == [f"{folder}/00000.tar"]


def test_image_training_on_a_cache_folder_is_one_line(tmp_path):
    write_shard(tmp_path / "00000.tar", [Sample("k", {"safetensors": b"", "json": b"{}"})])
    write_manifest(tmp_path, Manifest(options={"cache": {"format": CACHE_FORMAT}}))
    assert "holds an embedding cache, not images; train from it with data=cached" in _data_error(tmp_path / "*.tar")


def test_a_failing_pipe_command_is_one_line_naming_it():
    loader = build_train_loader({"shards": "pipe:false", "resolution": 32, "num_workers": 0}, batch_size=1, seed=0,
                                rank=0, world_size=1)
    with pytest.raises(NoUsableData, match=r"pipe command failed") as err:
        next(itertools.islice(iter(loader), 1))
    assert isinstance(err.value, ConfigError) and "\n" not in str(err.value)
