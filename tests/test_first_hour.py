"""A new user's first hour: fast help and one-line mistakes, paths that work from any folder, quiet runs
whose files all land in the run folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from instantstyle.models import BaseModelError, load_base
from train.builders import build_base
from train.checks import check_config, check_data, check_model
from train.config import ConfigError, compose

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers")
# Runs `python -m train ARGS` in this process, then reports its exit status and the heavy libraries it imported.
PROBE = f"""
import runpy, sys
sys.argv[0] = "train"
code = 0
try:
    runpy.run_module("train", run_name="__main__")
except SystemExit as done:
    code = done.code or 0
print("HEAVY:" + ",".join(m for m in {HEAVY!r} if m in sys.modules), "EXIT:" + str(code))
"""


def env(**extra: str) -> dict:
    """The subprocess imports this worktree wherever it runs, offline."""
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **extra}


def run_train(args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def test_help_is_the_projects_and_imports_no_ml_library(tmp_path):
    proc = run_train(["--help"], tmp_path)
    assert proc.stdout.strip().endswith("HEAVY: EXIT:0"), proc.stdout + proc.stderr
    assert "powered by Hydra" not in proc.stdout
    assert "model: flux, sd15, sdxl, tiny, toy" in proc.stdout and "docs/config.md" in proc.stdout
    assert run_train(["--cfg", "job", "model=toy"], tmp_path).stdout.strip().endswith("HEAVY: EXIT:0")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("override, message", [
    ("trainer.max_stepz=3", "error: unknown trainer key(s) ['max_stepz'] — did you mean trainer.max_steps?"),
    ("trainer.max_steps=abc", "error: trainer.max_steps: Value 'abc' of type 'str' could not be converted to Integer"),
    ("trainer.max_steps=0", "error: trainer.max_steps must be ≥ 1 (got 0)"),
    ("model=tny", "error: model=tny — valid: flux, sd15, sdxl, tiny, toy"),
])
def test_config_mistake_is_one_line_before_any_ml_import(tmp_path, override, message):
    proc = run_train(["data.shards=x.tar", override], tmp_path)
    assert proc.stdout.strip().endswith("HEAVY: EXIT:2"), proc.stdout + proc.stderr
    assert proc.stderr.strip() == message, proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_multirun_with_output_dir_is_refused(tmp_path):
    proc = run_train(["-m", "optim.lr=1e-4,3e-4", "output_dir=run"], tmp_path)
    assert proc.stdout.strip().endswith("EXIT:2") and proc.stderr.startswith("error: output_dir= with -m"), proc.stderr


def test_toy_base_loads_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose(["model=toy"])
    assert cfg.model.path == "data_tools/toy_base"  # as written; resolved from the package root
    assert check_model(cfg.model, cfg.blocks, cfg.data.clip_image_size)[0] == "sdxl"
    base = instantiate(cfg.model)
    assert base.image_encoder.config.image_size == 64 and Path(base.path) == REPO / "data_tools" / "toy_base"


def test_missing_local_base_is_one_line_without_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = compose(["model=toy", "model.path=./bases/mine"])
    with pytest.raises(ConfigError, match=r"^model.path=./bases/mine: no such folder"):
        check_model(cfg.model, cfg.blocks, 64)
    with pytest.raises(ConfigError, match=r"^model.path=./bases/mine: no such folder"):
        build_base("./bases/mine")
    with pytest.raises(BaseModelError, match=r"^./bases/mine: no such folder$"):
        load_base("./bases/mine")  # the library: same rule, no hub request


def test_tiny_base_is_built_in_the_cache_not_where_you_stand(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INSTANTSTYLE_CACHE", str(tmp_path / "cache"))
    cfg = compose(["model=tiny"])
    assert cfg.model.path == str(tmp_path / "cache" / "tiny-sdxl")
    base = instantiate(cfg.model)
    assert (tmp_path / "cache" / "tiny-sdxl" / "unet").is_dir() and base.family == "sdxl"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no demo/ here, no half-built folder


def test_toy_preset_carries_the_sizes_it_needs(shards, tmp_path):
    cfg = compose(["model=toy", f"data.shards={shards}/*.tar", f"output_dir={tmp_path}"])
    assert (cfg.data.resolution, cfg.data.clip_image_size) == (64, 64)
    check_config(cfg)
    with pytest.raises(ConfigError) as err:
        check_config(compose(["model=toy", f"data.shards={shards}/*.tar", f"output_dir={tmp_path}",
                                 "data.clip_image_size=224"]))
    assert str(err.value) == ("data.clip_image_size=224, but the image encoder of model.path=data_tools/toy_base "
                              "takes 64 px: set data.clip_image_size=64")


def test_data_workers_are_capped_at_the_cpus(shards):
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cfg = compose([f"data.shards={shards}/*.tar", f"data.num_workers={cpus + 3}"])
    assert check_data(cfg.data)[0].num_workers == cpus


def test_base_loads_without_deprecation_notices_or_bars(tmp_path):
    probe = "from instantstyle.models import load_base; load_base('data_tools/toy_base'); print('LOADED')"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.strip() == "LOADED", proc.stderr
    assert "torch_dtype" not in proc.stderr and "Loading weights" not in proc.stderr, proc.stderr


def test_demo_run_is_quiet_and_keeps_every_file_in_its_folder(shards, tmp_path):
    """From another folder: model=toy resolves, no outputs/ appears there, Hydra's log is in RUN."""
    here, run = tmp_path / "elsewhere", tmp_path / "run"
    here.mkdir()
    args = ["experiment=demo", f"data.shards={shards}/*.tar", "trainer.max_steps=2", "trainer.batch_size=2",
            "trainer.log_every=1", "data.shuffle_buffer=8", f"output_dir={run}"]
    proc = subprocess.run([sys.executable, "-m", "train", *args], cwd=here, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    noisy = [line for line in (proc.stdout + proc.stderr).splitlines()
             if any(word in line for word in ("warn", "Warn", "WARN", "requires torchvision", "Failed to load"))]
    assert noisy == [], noisy
    assert list(here.iterdir()) == []  # no outputs/<time>/ beside the user
    assert (run / "ip-adapter.safetensors").is_file() and (run / ".hydra" / "config.yaml").is_file()
    log = (run / "train_rank0.log").read_text()
    assert "step 2/2 loss" in log  # the text log, one line per window
    assert "device: cpu, " in log.splitlines()[0] and " torch thread" in log.splitlines()[0]  # the CPU thread choice


def test_sweep_jobs_each_get_their_own_folder(tiny_model_dir, shards, tmp_path):
    args = ["-m", "experiment=block_lr_sweep", "blocks=style", "optim.lr=1e-4,3e-4", f"model.path={tiny_model_dir}",
            f"data.shards={shards}/*.tar", "data.resolution=64", "data.num_workers=0", "data.shuffle_buffer=8",
            "trainer.batch_size=2", "trainer.max_steps=1", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run([sys.executable, "-m", "train", *args], cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert (tmp_path / "sweep" / job / "ip-adapter.safetensors").is_file()
        assert (tmp_path / "sweep" / job / "train_rank0.log").is_file()
    assert not (tmp_path / "outputs").exists()


def test_ci_runs_the_readmes_setup_and_test_lines():
    """.ci/run installs as a new user would and runs the README's own test command, nothing else."""
    block = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    readme = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [line.split("  #")[0].strip() for line in readme if line.strip() != "./launch.sh"]
    assert ci[0].startswith("[ -d .venv ] ||") and ci[-1] == "python -m pytest -q"


@pytest.mark.parametrize("module, needle", [
    ("data_tools.synthetic", "(default: 128)"), ("data_tools.make_shards", "(default: 1000)"),
    ("data_tools.inspect", "(default: 178956970)"), ("data_tools.make_tiny_model", "(default: 0)"),
])
def test_data_tool_help_shows_defaults(module, needle, capsys):
    with pytest.raises(SystemExit):
        __import__(module, fromlist=["main"]).main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert needle in text and "(default: None)" not in text


def test_one_shard_is_singular(tmp_path, capsys):
    from data_tools.synthetic import main

    main(["--out", str(tmp_path / "s"), "--num", "2", "--size", "16"])
    assert capsys.readouterr().out.strip() == f"wrote 2 samples in 1 shard to {tmp_path / 's'}"


def test_one_shard_warning_is_singular(tmp_path, caplog):
    from data_tools.synthetic import write_synthetic_shards
    from train.data import build_train_loader

    write_synthetic_shards(tmp_path, num=2, size=16)
    (tmp_path / "manifest.json").unlink()  # no counts: the loader warns about the one shard
    build_train_loader({"shards": str(tmp_path / "*.tar"), "num_workers": 2}, batch_size=1, seed=0, rank=0,
                       world_size=1)
    assert "1 of 1 shard has no sample counts" in caplog.text
