"""The composed config: every group instantiates, and each bad config fails early with one actionable line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from instantstyle.blocks import ALL_BLOCKS
from train.checks import check_config, target_blocks
from train.config import CONFIG_DIR, ConfigError, check_sections, compose
from train.loggers import Trackers

REPO = Path(__file__).resolve().parents[1]


def base_overrides(model_dir: str, shards: str, out) -> list[str]:
    return [f"model.path={model_dir}", f"data.shards={shards}/*.tar", f"output_dir={out}", "data.num_workers=0"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_group_option_composes_and_instantiates(tiny_model_dir, shards, tmp_path):
    assert options("model") == ["flux", "sd15", "sdxl", "tiny", "toy"] and options("blocks") == ["all", "layout", "style", "style_layout"]
    assert options("adapter") == ["ip_adapter", "ip_adapter_plus"] and options("logger") == ["none", "tensorboard", "wandb"]
    params = [torch.nn.Parameter(torch.zeros(2))]
    for optim in options("optim"):
        cfg = compose([*base_overrides(tiny_model_dir, shards, tmp_path), f"optim={optim}"])
        assert cfg.optim.lr == 1e-4
        if optim == "adamw":
            assert isinstance(instantiate(cfg.optim)(params), torch.optim.AdamW)
    for logger in options("logger"):
        cfg = compose([*base_overrides(tiny_model_dir, shards, tmp_path), f"logger={logger}"])
        trackers = instantiate(cfg.logger, run_dir=str(tmp_path))
        assert isinstance(trackers, Trackers) and trackers.log_with == ([] if logger == "none" else [logger])
    assert instantiate(compose([*base_overrides(tiny_model_dir, shards, tmp_path), "logger=wandb"]).logger,
                       run_dir="R").init_kwargs == {"wandb": {"mode": "offline", "dir": "R", "tags": []}}
    cfg = compose(base_overrides(tiny_model_dir, shards, tmp_path))
    assert check_config(cfg).trainer.mixed_precision == "no"  # YAML `no` stays a string
    base = instantiate(cfg.model)
    for preset, expected in [("style", ["up_blocks.0.attentions.1"]), ("all", list(ALL_BLOCKS)),
                             ("style_layout", ["up_blocks.0.attentions.1", "down_blocks.2.attentions.1"])]:
        blocks = compose([*base_overrides(tiny_model_dir, shards, tmp_path), f"blocks={preset}"]).blocks
        assert target_blocks(blocks, "sdxl") == expected
    for adapter, tokens in [("ip_adapter", 4), ("ip_adapter_plus", 16)]:
        cfg = compose([*base_overrides(tiny_model_dir, shards, tmp_path), f"adapter={adapter}", "adapter.resampler_dim=64"])
        built = instantiate(cfg.adapter)(base, blocks=["up_blocks.0.attentions.1"])
        assert built.spec.num_tokens == tokens and len(built.layers) == 2
    sdxl = compose(["model=sdxl", f"output_dir={tmp_path}"]).model
    assert sdxl.path == "stabilityai/stable-diffusion-xl-base-1.0"
    assert sdxl.image_encoder == "h94/IP-Adapter:sdxl_models/image_encoder"
    toy = instantiate(compose(["model=toy", f"output_dir={tmp_path}"]).model)
    assert toy.family == "sdxl" and toy.image_encoder.config.image_size == 64


def test_custom_block_list_and_experiment_presets(tiny_model_dir, shards, tmp_path):
    cfg = compose([*base_overrides(tiny_model_dir, shards, tmp_path), "blocks.targets=[mid_block,up_blocks.1]"])
    assert target_blocks(cfg.blocks, "sdxl") == ["mid_block", "up_blocks.1"]
    check_config(cfg)
    for name in options("experiment"):
        cfg = compose([*base_overrides(tiny_model_dir, shards, tmp_path), f"experiment={name}"])
        check_sections(cfg)


def mismatched_encoder(tmp_path) -> str:
    """An image encoder projecting to 16 dims, while the tiny text_encoder_2 projects to 32."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=224, patch_size=32, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "encoder16")
    return str(tmp_path / "encoder16")


@pytest.mark.parametrize("override, message", [
    ("blocks.targets=[up_blocks.9]", "unknown block 'up_blocks.9' — valid: down_blocks.1.attentions.0,"),
    ("data.shards=/nonexistent/*.tar", "data.shards='/nonexistent/*.tar' matched no shards"),
    ("data.shards=/nonexistent/000.tar", "data.shards: /nonexistent/000.tar does not exist"),
    ("trainer.batch_size=0", "trainer.batch_size must be ≥ 1 (got 0)"),
    ("trainer.lr_scheduler=step", "trainer.lr_scheduler='step' — valid: constant, cosine, linear"),
    ("blocks.preset=bogus", "blocks.preset='bogus' — valid: style, layout, style_layout, all"),
    ("PLUS", "trainer.content_scale=0.5 needs adapter=ip_adapter"),
    ("resume=/nonexistent", "resume=/nonexistent: not a complete checkpoint folder"),
    ("ENCODER", "content subtraction needs image and text embeddings in one space"),
])
def test_bad_config_is_one_line_error(tiny_model_dir, shards, tmp_path, override, message):
    if override == "ENCODER":
        override = f"model.image_encoder={mismatched_encoder(tmp_path)}"
    extra = ["adapter=ip_adapter_plus", "trainer.content_scale=0.5"] if override == "PLUS" else [override]
    with pytest.raises(ConfigError) as err:
        check_config(compose([*base_overrides(tiny_model_dir, shards, tmp_path), *extra]))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_adamw8bit_without_bitsandbytes(tiny_model_dir, shards, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when absent
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(ConfigError, match="optim=adamw8bit needs bitsandbytes: pip install bitsandbytes"):
        check_config(compose([*base_overrides(tiny_model_dir, shards, tmp_path), "optim=adamw8bit"]))


# Run the real command line: exit status 2, one `error:` line, no traceback.
NO_BNB = "import sys, runpy; sys.modules['bitsandbytes'] = None; sys.argv[0] = 'train'; runpy.run_module('train', run_name='__main__')"


def test_command_line_reports_bad_configs_without_traceback(tiny_model_dir, shards, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    common = base_overrides(tiny_model_dir, shards, tmp_path / "run")
    cases = {
        "trainer.batch_size must be ≥ 1 (got 0)": [sys.executable, "-m", "train", *common, "trainer.batch_size=0"],
        "unknown block 'up_blocks.9'": [sys.executable, "-m", "train", *common, "blocks.targets=[up_blocks.9]"],
        "optim=adamw8bit needs bitsandbytes": [sys.executable, "-c", NO_BNB, *common, "optim=adamw8bit"],
    }
    procs = {msg: subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for msg, cmd in cases.items()}  # in parallel: each pays the import cost once
    for message, proc in procs.items():
        _, stderr = proc.communicate(timeout=180)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, stderr[-1500:]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
