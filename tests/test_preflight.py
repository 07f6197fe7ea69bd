"""``python -m train.preflight``: the checks a run makes before loading models, once, without training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import ConfigError
from train.preflight import main, preflight

REPO = Path(__file__).resolve().parents[1]


def test_a_run_that_would_start_passes_silently_and_writes_nothing(shards, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([f"data.shards={shards}/*.tar", "data.resolution=64"]) == 0
    assert capsys.readouterr() == ("", "") and list(tmp_path.iterdir()) == []


def test_a_mistake_is_one_error_line_and_exit_2(shards, capsys):
    assert main([f"data.shards={shards}/*.tar", "blocks.targets=[up_blocks.9.attentions.1]"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: unknown block 'up_blocks.9.attentions.1'") and err.count("\n") == 1


def test_the_run_folder_is_checked_under_the_name_hydra_will_give_it(shards, tmp_path, monkeypatch):
    """launch.sh sets RUN_NAME; configs/train.yaml names the run outputs/RUN_NAME (or hydra.run.dir, output_dir)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").write_text("a file where the runs folder would be")
    monkeypatch.setenv("RUN_NAME", "night-1")
    data = f"data.shards={shards}/*.tar"
    with pytest.raises(ConfigError, match=r"^output_dir=outputs/night-1: .*outputs is a file"):
        preflight([data])
    with pytest.raises(ConfigError, match=r"^output_dir=outputs/b: "):
        preflight([data, "hydra.run.dir=outputs/b"])
    preflight([data, "hydra.run.dir=elsewhere/b"])
    with pytest.raises(ConfigError, match=r"^output_dir=outputs/c: "):
        preflight([data, "hydra.run.dir=elsewhere/b", "output_dir=outputs/c"])


def test_a_sweep_is_composed_but_its_points_are_checked_when_they_start(shards):
    preflight(["-m", f"data.shards={shards}/*.tar", "optim.lr=1e-4,-1"])  # each point meets check_config itself
    with pytest.raises(ConfigError, match="hydra.sweep.dir"):
        preflight(["-m", f"data.shards={shards}/*.tar", "output_dir=runs/a"])


def test_validation_metric_encoders_are_left_for_training_to_load(shards, tmp_path, monkeypatch):
    """They weigh a gigabyte or more; the preflight stops before them (training still loads and checks them)."""
    import instantstyle.evaluate as evaluate

    monkeypatch.setattr(evaluate, "load_metric_encoders", lambda *a, **k: pytest.fail("loaded in the preflight"))
    (tmp_path / "styles").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "styles" / "red.png")
    preflight([f"data.shards={shards}/*.tar", f"validation.styles={tmp_path}/styles", "validation.prompts=[a cat]",
               "validation.content_scale=0", f"validation.csd={tmp_path}/csd.pt", f"output_dir={tmp_path}/run"])


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_only_the_first_rank_says_what_the_cache_implies(tmp_path, rank, said):
    from tests.test_first_day import fake_cache

    cache = fake_cache(tmp_path / "cache")  # made for ip_adapter_plus; not a whole cache, so training stops
    env = {**os.environ, "RANK": rank, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "train", "data=cached", f"data.shards={cache}",
                           f"output_dir={tmp_path}/run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    line = "data=cached: the cache was made for adapter=ip_adapter_plus, so training uses it"
    assert (line in proc.stdout) == said, proc.stdout + proc.stderr[-2000:]


def test_help_says_what_it_checks(capsys):
    assert main(["--help"]) == 0
    assert "trains nothing" in capsys.readouterr().out


@pytest.mark.parametrize("model", [["model=sdxl"], ["model=flux", "blocks=all"]])
def test_an_offline_machine_is_told_to_download_the_hub_base_first(shards, tmp_path, monkeypatch, model):
    """Compute nodes often have no network: diffusers' own message ("no file named config.json") hides why."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    args = [f"data.shards={shards}/*.tar", *model, "model.path=someone/base", f"output_dir={tmp_path}/run"]
    with pytest.raises(ConfigError, match=r"^model.path=someone/base: cannot read .* — HF_HUB_OFFLINE is set, "
                                          r"so only the Hugging Face cache is read: run `hf download someone/base` "
                                          r"where there is network") as err:
        preflight([*args, "model.image_encoder=/a/local/encoder"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"`hf download someone/base` and `hf download h94/IP-Adapter`"):
        preflight([*args, "model.image_encoder=h94/IP-Adapter:sdxl_models/image_encoder"])
