"""The installed package works outside the checkout: the wheel carries the configs and the toy base,
and a user with only the wheel can see the help, train the toy base, export and generate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built without network (setuptools comes with the test extra)."""
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source") / "repo"
    # A copy without build/ or .venv: setuptools reuses build/lib, where files moved away since could linger.
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                 "outputs", "multirun", "demo", "runs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    (found,) = out.glob("*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel's packages unpacked as pip installs them, and nothing of the checkout."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return target


def test_wheel_carries_configs_and_toy_base_but_not_benchmarks_or_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    configs = {n.removeprefix("train/configs/") for n in names if n.startswith("train/configs/")}
    assert configs == {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml")}
    toy = {n.removeprefix("data_tools/toy_base/") for n in names if n.startswith("data_tools/toy_base/")}
    assert toy == {str(p.relative_to(REPO / "data_tools" / "toy_base"))
                   for p in (REPO / "data_tools" / "toy_base").rglob("*") if p.is_file()}
    assert not [n for n in names if n.startswith(("benchmarks/", "tests/"))]


def test_installed_wheel_trains_exports_and_generates_from_an_empty_folder(installed, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}

    def run(*args: str, timeout: int = 300) -> str:
        proc = subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    where = run("-c", "import train.config as c, data_tools, instantstyle; "
                      "print(c.CONFIG_DIR); print(data_tools.__file__); print(instantstyle.__file__)")
    assert all(line.startswith(str(installed)) for line in where.split()), where
    assert "Config groups" in run("-m", "train", "--help")
    run("-m", "data_tools.synthetic", "--out", "shards", "--num", "8", "--size", "64", "--per-shard", "4")
    run("-m", "train", "model=toy", "data.shards=shards/*.tar", "data.resolution=64", "data.num_workers=0",
        "data.shuffle_buffer=4", "trainer.batch_size=2", "trainer.max_steps=2", "trainer.checkpoint_every=2",
        "logger=none", "output_dir=run")
    (checkpoint,) = (work / "run" / "checkpoints").glob("checkpoint-*")
    run("-m", "train.export", str(checkpoint), "--out", "again.safetensors")
    assert (work / "run" / "ip-adapter.safetensors").is_file() and (work / "again.safetensors").is_file()
    style = next((installed / "data_tools" / "toy_base").rglob("*.png"), None) or _a_style_image(work)
    run("-m", "instantstyle.generate", "--base", str(installed / "data_tools" / "toy_base"),
        "--adapter", "run/ip-adapter.safetensors", "--style-image", str(style), "--prompt", "a ring",
        "--steps", "2", "--out", "out.png")
    assert (work / "out.png").stat().st_size > 0
    assert not (work / "outputs").exists()


def _a_style_image(folder: Path) -> Path:
    from PIL import Image

    path = folder / "style.png"
    Image.new("RGB", (64, 64), (200, 40, 90)).save(path)
    return path
