"""Evaluation metrics as training validation: reports, tracker scalars and images, and no effect on training."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from train.checkpoint import capture_rng
from train.checks import check_config
from train.config import ConfigError, compose
from train.loop import training_state_kept
from train.sweep import read_metrics
from train.training import train
from tests.helpers import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
METRICS = ("style_similarity", "text_alignment", "content_leakage")
# EMA, noise offset and CFG drops: every random stream and state that validation could disturb.
RUN_ARGS = ("trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.ema=0.9", "trainer.noise_offset=0.05",
            "optim.lr=1e-3", "data.drop_image_prob=0.3", "logger=tensorboard")


@pytest.fixture(scope="module")
def styles(tmp_path_factory) -> tuple[str, str]:
    """(style folder with two synthetic styles and their content captions, prompts file)."""
    from data_tools.synthetic import content_caption, render, sample_attributes

    folder = tmp_path_factory.mktemp("styles")
    rng = np.random.default_rng(0)
    for i in range(2):
        attributes = sample_attributes(rng)
        render(attributes, 64).save(folder / f"style{i}.png")
        (folder / f"style{i}.txt").write_text(content_caption(attributes))
    prompts = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompts.write_text("# validation prompts\na circle\n\na square\n")
    return str(folder), str(prompts)


def validation_args(styles: tuple[str, str], every: int = 2) -> list[str]:
    return [f"validation.styles={styles[0]}", f"validation.prompts={styles[1]}", f"validation.every={every}",
            "validation.steps=2", "validation.content_scale=0.5"]


def finished(run) -> dict:
    """What must not depend on validation: every RNG stream (read right after train returns) and the UNet wiring."""
    unet = run.base.unet
    return {"rng": capture_rng(run.generator), "scales": [p.scale for p in run.adapter.layers],
            "processors": {k: type(v).__name__ for k, v in unet.attn_processors.items()},
            "hid_proj": unet.encoder_hid_proj, "hid_type": unet.config.encoder_hid_dim_type}


@pytest.fixture(scope="module")
def plain(tiny_model_dir, shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    run = train(compose(tiny_overrides(tiny_model_dir, shards, out, *RUN_ARGS)))
    return out, run, finished(run)


@pytest.fixture(scope="module")
def validated(tiny_model_dir, shards, styles, tmp_path_factory):
    out = tmp_path_factory.mktemp("validated")
    run = train(compose(tiny_overrides(tiny_model_dir, shards, out, *RUN_ARGS, *validation_args(styles))))
    return out, run, finished(run)


def test_validation_writes_reports_and_logs_metrics_and_grid(validated):
    out, _run, _state = validated
    reports = sorted((out / "eval").iterdir())
    assert [p.name for p in reports] == ["step-00000002", "step-00000004"]
    for report in reports:
        assert sorted(p.name for p in report.iterdir()) == ["grid.png", "metrics.json", "metrics.md"]
        setting = json.loads((report / "metrics.json").read_text())["settings"][0]
        assert setting["content_scale"] == 0.5 and setting["num_samples"] == 2 * 2  # styles × prompts × 1 seed
        assert all(math.isfinite(setting["mean"][m]) for m in METRICS)
    last = json.loads((reports[-1] / "metrics.json").read_text())["settings"][0]["mean"]
    assert read_metrics(out)[0] == last  # the sweep table reads the newest validation (means, baselines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["validation"] == {"step": 4, **last}

    events = EventAccumulator(str(next((out / "logs").glob("*")))).Reload()
    for metric in METRICS:
        scalars = events.Scalars(f"val/{metric}")
        assert [e.step for e in scalars] == [2, 4]
        assert scalars[-1].value == pytest.approx(last[metric], rel=1e-6)
    grids = events.Images("val/grid")
    assert [e.step for e in grids] == [2, 4]
    # reference + 2 prompts; 2 styles × 1 seed; plus the label header and row-label column (less than a cell)
    assert 0 < grids[0].width - 3 * 256 < 256 and 0 < grids[0].height - 2 * 256 < 256


def test_validation_leaves_training_bitwise_unchanged(plain, validated):
    (plain_dir, plain_run, plain_state), (val_dir, val_run, val_state) = plain, validated
    assert not (plain_dir / "eval").exists()
    for name in ("adapter", "optimizer", "ema"):
        ref = load_file(str(plain_dir / f"checkpoints/checkpoint-00000004/{name}.safetensors"))
        new = load_file(str(val_dir / f"checkpoints/checkpoint-00000004/{name}.safetensors"))
        assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref), name
    for key, value in plain_run.adapter.state_dict().items():  # the exported (EMA) weights
        assert torch.equal(value, val_run.adapter.state_dict()[key]), key
    assert val_state == plain_state and val_state["hid_proj"] is None


def test_kept_state_undoes_random_draws_and_scales(validated):
    run = validated[1]
    before, scales = capture_rng(run.generator), [p.scale for p in run.adapter.layers]
    with training_state_kept(run):
        torch.rand(3), np.random.rand(), random.random(), torch.rand(2, generator=run.generator)
        run.adapter.set_scale(0.25)
    assert capture_rng(run.generator) == before and [p.scale for p in run.adapter.layers] == scales


@pytest.mark.parametrize("extra, message", [
    (["validation.every=2", "validation.prompts=[a cat]"], "validation.every=2 needs validation.styles=DIR"),
    (["validation.styles=/nonexistent", "validation.every=2"], "validation.styles: style folder not found"),
    (["validation.styles=EMPTY", "validation.every=2"], "validation.styles: no images"),
    (["validation.styles=STYLES", "validation.every=2"], "validation.prompts is required"),
    (["validation.styles=STYLES", "validation.prompts=/nonexistent.txt"], "validation.prompts: prompts file not found"),
    (["validation.styles=STYLES", "validation.prompts=[a cat]", "adapter=ip_adapter_plus"],
     "validation.content_scale=0.5 needs adapter=ip_adapter"),
    (["validation.seeds=[]"], "validation.seeds must be a list of integers"),
    (["validation.height=100"], "validation.height/width must be positive multiples of 8"),
    (["+validation.guidance=3"], "unknown validation key(s) ['guidance']"),
    (["validation.styles=STYLES", "validation.prompts=[a cat]", "validation.dino=/nonexistent"], "validation.csd/dino:"),
])
def test_bad_validation_config_is_one_line_error(tiny_model_dir, shards, styles, tmp_path, extra, message):
    (tmp_path / "empty").mkdir()
    extra = [e.replace("STYLES", styles[0]).replace("EMPTY", str(tmp_path / "empty")) for e in extra]
    if "adapter=ip_adapter_plus" in extra:
        extra.append("validation.content_scale=0.5")
    with pytest.raises(ConfigError) as err:
        check_config(compose(tiny_overrides(tiny_model_dir, shards, tmp_path, *extra)))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_command_line_exits_2_on_missing_styles_folder(tiny_model_dir, shards, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    args = tiny_overrides(tiny_model_dir, shards, tmp_path / "run", "validation.styles=/nonexistent/styles",
                     "validation.every=2", "validation.prompts=[a cat]")
    proc = subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=180)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert errors == ["error: validation.styles: style folder not found: /nonexistent/styles"]
    # The run folder holds Hydra's record and the log of the attempt (output_dir is Hydra's run dir), nothing else.
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_validation_adds_csd_and_dino_metrics(tiny_model_dir, shards, styles, tmp_path):
    from safetensors.torch import save_file
    from test_style_metrics import csd_state, random_csd, save_tiny_vit

    visual, head = random_csd()
    save_file(csd_state(visual, head), tmp_path / "csd.safetensors")
    save_tiny_vit(tmp_path / "dino", "vit")
    run = train(compose(tiny_overrides(tiny_model_dir, shards, tmp_path / "run", "trainer.max_steps=2",
                                       *validation_args(styles), f"validation.csd={tmp_path / 'csd.safetensors'}",
                                       f"validation.dino={tmp_path / 'dino'}")))
    means = run.summary["validation"]
    assert -1 <= means["csd_style_similarity"] <= 1 and -1 <= means["dino_content_leakage"] <= 1
    assert all(math.isfinite(means[m]) for m in METRICS)
