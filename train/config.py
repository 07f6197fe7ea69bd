"""Validate the composed training config in one place, before anything heavy is loaded.

Every problem becomes a ``ConfigError`` whose message is one line that says what to do;
``python -m train`` prints it and exits 2 without a traceback.
"""

from __future__ import annotations

import glob
import importlib
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from instantstyle.blocks import PRESET_NAMES, UnknownBlockError, resolve_blocks, select_layers
from instantstyle.content import ContentSpaceMismatch, check_content_space
from instantstyle.models import BaseModelError, resolve_image_encoder
from instantstyle.projection import ADAPTER_TYPES

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
LR_SCHEDULERS = ("constant", "cosine", "linear")
PRECISIONS = ("no", "fp16", "bf16")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ConfigError(ValueError):
    """A config value that cannot work; the message is one actionable line."""


@dataclass(frozen=True)
class TrainerConfig:
    """The ``trainer`` section, typed."""

    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    checkpoints_to_keep: int = 3
    seed: int = 42
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    ema: float | None = None
    log_every: int = 10
    validate_every: int = 0
    record_sample_keys: bool = False

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the frozen networks."""
        return DTYPES[self.mixed_precision]


def trainer_config(section: Any) -> TrainerConfig:
    """Typed trainer settings; unknown keys and bad ranges are errors."""
    values = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    valid = {f.name for f in fields(TrainerConfig)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"unknown trainer key(s) {unknown} — valid: {', '.join(sorted(valid))}")
    if values.get("mixed_precision") is False:  # YAML 1.1 reads a bare `no` as false
        values["mixed_precision"] = "no"
    cfg = TrainerConfig(**values)
    _check_trainer(cfg)
    return cfg


def _check_trainer(t: TrainerConfig) -> None:
    checks = [
        (t.batch_size >= 1, f"trainer.batch_size must be ≥ 1 (got {t.batch_size})"),
        (t.gradient_accumulation_steps >= 1, "trainer.gradient_accumulation_steps must be ≥ 1"),
        (t.max_steps >= 1, f"trainer.max_steps must be ≥ 1 (got {t.max_steps})"),
        (t.lr_scheduler in LR_SCHEDULERS, f"trainer.lr_scheduler={t.lr_scheduler!r} — valid: {', '.join(LR_SCHEDULERS)}"),
        (t.warmup_steps >= 0, "trainer.warmup_steps must be ≥ 0"),
        (t.max_grad_norm is None or t.max_grad_norm > 0, "trainer.max_grad_norm must be > 0, or null for no clipping"),
        (t.mixed_precision in PRECISIONS, f"trainer.mixed_precision={t.mixed_precision!r} — valid: {', '.join(PRECISIONS)}"),
        (t.checkpoint_every >= 0, "trainer.checkpoint_every must be ≥ 0 (0 = only at the end)"),
        (t.checkpoints_to_keep >= 1, "trainer.checkpoints_to_keep must be ≥ 1"),
        (t.noise_offset >= 0, "trainer.noise_offset must be ≥ 0"),
        (t.snr_gamma is None or t.snr_gamma > 0, "trainer.snr_gamma must be > 0 (e.g. 5.0), or null"),
        (t.ema is None or 0 < t.ema < 1, "trainer.ema is a decay in (0, 1), e.g. 0.999, or null"),
        (t.log_every >= 1 and t.validate_every >= 0, "trainer.log_every must be ≥ 1 and trainer.validate_every ≥ 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if t.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("trainer.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")


@dataclass(frozen=True)
class ValidationConfig:
    """The ``validation`` section, typed: evaluation metrics on fixed style references during training."""

    styles: str | None = None  # folder of style images; None = off
    prompts: tuple[str, ...] = ()  # already read from the prompts file
    every: int = 0  # steps; 0 = off
    steps: int = 20
    seeds: tuple[int, ...] = (0,)
    content_scale: float = 0.0
    height: int | None = None
    width: int | None = None

    @property
    def enabled(self) -> bool:
        """True when the loop should evaluate."""
        return self.styles is not None and self.every > 0


def validation_config(section: Any, adapter_type: str = "ip_adapter") -> ValidationConfig:
    """Typed ``validation`` settings (absent = off); the prompts are read and the style folder checked."""
    values = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section or {})
    valid = {f.name for f in fields(ValidationConfig)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"unknown validation key(s) {unknown} — valid: {', '.join(sorted(valid))}")
    if "seeds" in values:
        seeds = values["seeds"]
        values["seeds"] = tuple(seeds) if isinstance(seeds, (list, tuple)) else (seeds,)
    v = ValidationConfig(**{**values, "prompts": ()})
    _check_validation_numbers(v)
    if v.styles is None:
        if v.every > 0:
            raise ConfigError(f"validation.every={v.every} needs validation.styles=DIR (style images with .txt "
                              "content captions), or set validation.every=0")
        return v
    _check_styles(v, adapter_type)
    return ValidationConfig(**{**values, "prompts": _validation_prompts(values.get("prompts"))})


def _check_validation_numbers(v: ValidationConfig) -> None:
    sizes_ok = all(s is None or (s > 0 and s % 8 == 0) for s in (v.height, v.width))
    checks = [
        (v.every >= 0, f"validation.every must be ≥ 0 (0 = off), got {v.every}"),
        (v.steps >= 1, f"validation.steps must be ≥ 1 (denoising steps), got {v.steps}"),
        (len(v.seeds) > 0 and all(isinstance(s, int) for s in v.seeds), "validation.seeds must be a list of "
         f"integers, e.g. [0, 1] (got {list(v.seeds)})"),
        (sizes_ok, f"validation.height/width must be positive multiples of 8, or null (got {v.height}x{v.width})"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _check_styles(v: ValidationConfig, adapter_type: str) -> None:
    """The style folder holds readable images, captioned when content is subtracted."""
    from instantstyle.evaluate import load_references
    from instantstyle.pipeline import GenerationError

    try:
        refs = load_references(v.styles)
    except GenerationError as err:
        raise ConfigError(f"validation.styles: {err}") from err
    if v.content_scale != 0:
        if adapter_type != "ip_adapter":
            raise ConfigError(f"validation.content_scale={v.content_scale} needs adapter=ip_adapter "
                              f"({adapter_type} works on hidden states); set validation.content_scale=0")
        uncaptioned = [r.name for r in refs if r.caption is None]
        if uncaptioned:
            raise ConfigError(f"validation.content_scale={v.content_scale} needs a content caption per style: "
                              f"add {uncaptioned[0]}.txt in {v.styles} ({len(uncaptioned)} missing)")


def _validation_prompts(prompts: Any) -> tuple[str, ...]:
    """A prompts file (one per line) or a list of prompts."""
    from instantstyle.evaluate import read_prompts
    from instantstyle.pipeline import GenerationError

    if isinstance(prompts, str):
        try:
            return tuple(read_prompts(prompts))
        except GenerationError as err:
            raise ConfigError(f"validation.prompts: {err}") from err
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("validation.prompts is required: a text file (one prompt per line) or a list of prompts")
    return tuple(prompts)


def check_optimizer(optim: DictConfig) -> None:
    """The optimizer class must import (bitsandbytes for adamw8bit) and lr must be positive."""
    target = str(optim.get("_target_", ""))
    module, _, name = target.rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except ImportError as err:
        if module.startswith("bitsandbytes"):
            raise ConfigError("optim=adamw8bit needs bitsandbytes: pip install bitsandbytes, or use optim=adamw") from err
        raise ConfigError(f"optim._target_={target!r} cannot be imported: {err}") from err
    except AttributeError as err:
        raise ConfigError(f"optim._target_={target!r}: {module} has no {name}") from err
    if not float(optim.get("lr", 0)) > 0:
        raise ConfigError(f"optim.lr must be > 0 (got {optim.get('lr')})")


def check_data(data: DictConfig) -> None:
    """Data keys are valid and every local shard exists."""
    from train.data import DataConfig
    from data_tools.shards import expand_shards

    if OmegaConf.is_missing(data, "shards"):
        raise ConfigError("data.shards is required, e.g. data.shards='DIR/*.tar' (python -m data_tools.synthetic "
                          "--out DIR --num 64 makes some)")
    try:
        cfg = DataConfig.from_cfg(data)
        urls = expand_shards(cfg.shards)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise ConfigError(f"data.shards: {missing[0]} does not exist ({len(missing)} of {len(urls)} shards missing)")


def check_resume(resume: Any, output_dir: str) -> None:
    """resume is auto, none, or a checkpoint folder."""
    if resume in ("auto", "none", None):
        return
    if not Path(str(resume), "trainer_state.json").is_file():
        raise ConfigError(f"resume={resume}: not a complete checkpoint folder (no trainer_state.json); "
                          f"use resume=auto, resume=none or a path like {output_dir}/checkpoints/checkpoint-00001000")


def target_blocks(blocks: DictConfig, family: str) -> list[str] | None:
    """Block prefixes for ``blocks`` (custom ``targets`` win over the preset); None = all."""
    if blocks.get("targets"):
        return resolve_blocks(list(blocks.targets), family)
    if blocks.get("preset") not in PRESET_NAMES:
        raise ConfigError(f"blocks.preset={blocks.get('preset')!r} — valid: {', '.join(PRESET_NAMES)}, "
                          "or a custom list blocks.targets=[...]")
    return resolve_blocks(blocks.preset, family)


def check_model(cfg: DictConfig) -> None:
    """The base exists, the target blocks exist in its UNet, and the image encoder fits."""
    from diffusers import UNet2DConditionModel

    from instantstyle.models import model_family

    model = cfg.model
    if model.get("build_if_missing") and not Path(model.path, "unet").is_dir():
        return  # the tiny base is built on first use; it always fits
    try:
        unet_cfg = UNet2DConditionModel.load_config(model.path, subfolder="unet")
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_cfg)
        family = model_family(unet)
        select_layers(list(unet.attn_processors), target_blocks(cfg.blocks, family))
        _check_image_encoder(model, family, unet.config.cross_attention_dim)
    except (UnknownBlockError, ContentSpaceMismatch, BaseModelError) as err:
        raise ConfigError(str(err)) from err
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path={model.path}: cannot read the base model ({str(err).splitlines()[0]})") from err


def _check_image_encoder(model: DictConfig, family: str, cross_attention_dim: int) -> None:
    from transformers import CLIPTextConfig, CLIPVisionConfig

    enc_path, enc_sub = resolve_image_encoder(model.path, model.get("image_encoder"))
    kwargs = {"subfolder": enc_sub} if enc_sub else {}
    vision = CLIPVisionConfig.from_pretrained(enc_path, **kwargs)
    if model.get("check_content_space", True):
        sub = "text_encoder_2" if family == "sdxl" else "text_encoder"
        text = CLIPTextConfig.from_pretrained(model.path, subfolder=sub)
        text_dim = text.projection_dim if family == "sdxl" else text.hidden_size
        check_content_space(vision.projection_dim, text_dim)


def check_distributed(distributed_type: str) -> None:
    """Checkpoints are exact for data parallelism; sharded optimizer state (FSDP, ZeRO) is not saved yet."""
    if distributed_type in ("FSDP", "DEEPSPEED"):
        raise ConfigError(f"ACCELERATE_CONFIG selects {distributed_type}, whose sharded optimizer state these "
                          "checkpoints cannot hold yet; use ACCELERATE_CONFIG=ddp (the adapter is small)")


def validate_config(cfg: DictConfig) -> TrainerConfig:
    """Check the whole config; returns the typed trainer section or raises ``ConfigError``."""
    for key in ("output_dir", "model", "adapter", "blocks", "data", "optim", "logger", "trainer"):
        if key not in cfg or OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"config has no {key!r}: compose configs/train.yaml (python -m train ...)")
    trainer = trainer_config(cfg.trainer)
    if cfg.adapter.type not in ADAPTER_TYPES:
        raise ConfigError(f"adapter.type={cfg.adapter.type!r} — valid: {', '.join(ADAPTER_TYPES)}")
    if cfg.logger.name == "wandb" and cfg.logger.get("mode") not in ("online", "offline", "disabled"):
        raise ConfigError(f"logger.mode={cfg.logger.get('mode')!r} — valid: online, offline, disabled")
    validation_config(cfg.get("validation"), cfg.adapter.type)
    check_optimizer(cfg.optim)
    check_data(cfg.data)
    check_resume(cfg.resume, str(cfg.output_dir))
    check_model(cfg)
    init_from = cfg.adapter.get("init_from")
    if init_from and not glob.glob(str(init_from)):
        raise ConfigError(f"adapter.init_from={init_from}: file not found")
    return trainer


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """configs/train.yaml with Hydra overrides, outside ``@hydra.main`` (tests, notebooks); set output_dir."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))
