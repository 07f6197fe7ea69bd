"""One config form: once the config is checked, the run is built from the typed ``Settings`` alone."""

from __future__ import annotations

import torch
from helpers import tiny_overrides
from omegaconf import OmegaConf

from train.checks import check_config
from train.config import compose
from train.loggers import Trackers, loggable_config
from train.training import build_run, make_accelerator


def test_the_run_is_built_from_the_checked_settings_alone(tiny_model_dir, shards, tmp_path):
    cfg = compose(tiny_overrides(tiny_model_dir, shards, tmp_path / "run", "trainer.mixed_precision=auto"))
    settings = check_config(cfg)
    cfg.adapter.num_tokens, cfg.optim.lr = 8, 1.0  # the raw config no longer matters
    settings.adapter.num_tokens, settings.optim.lr, settings.blocks.preset = 2, 2.5e-4, "style_layout"
    settings.target_blocks = None  # so the blocks are resolved again, from settings.blocks
    accelerator = make_accelerator(settings.trainer, Trackers([], "test"), tmp_path / "run")
    run = build_run(settings, accelerator, tmp_path / "run")
    assert run.adapter.spec.num_tokens == 2
    assert run.optimizer.param_groups[0]["initial_lr"] == 2.5e-4
    assert set(run.adapter.spec.blocks) == {"up_blocks.0.attentions.1", "down_blocks.2.attentions.1"}
    # RUN/config.yaml and the trackers record what ran: "auto" precision resolved for this machine.
    record = OmegaConf.create(run.config_yaml)
    expected = "bf16" if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8 else (
        "fp16" if torch.cuda.is_available() else "no")
    assert record.trainer.mixed_precision == expected and record.adapter.num_tokens == 2
    assert loggable_config(settings.record())["optim.lr"] == 2.5e-4
