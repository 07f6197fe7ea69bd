"""Check the composed config against the world, once, before anything heavy is loaded.

Types and ranges are the schema's job (``train.config``); here are the checks that need the
file system or the base model's config: shards exist, blocks exist in the UNet, the image
encoder fits, the optimizer imports, the validation styles and prompts read. What they read
(shard list, resolved blocks, prompts, style references) is kept in ``Settings`` and used by
training as is, so nothing is read twice.
"""

from __future__ import annotations

import glob
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from train.config import (
    AdapterConfig,
    BlocksConfig,
    ConfigError,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    TrainerConfig,
    ValidationConfig,
    check_known_keys,
    resolve_precision,
    section,
)


@dataclass
class Settings:
    """The config, typed and checked: what ``train`` builds from."""

    trainer: TrainerConfig
    data: DataConfig
    shard_urls: list[str]
    validation: ValidationConfig
    prompts: tuple[str, ...] = ()
    references: list = field(default_factory=list)  # instantstyle.evaluate.StyleReference, read once
    family: str | None = None  # the base's model family; None until the tiny base is built


def target_blocks(blocks: Any, family: str) -> list[str]:
    """Block prefixes for ``blocks`` (custom ``targets`` win over the preset; ``all`` = ALL_BLOCKS)."""
    from instantstyle.blocks import PRESET_NAMES, is_preset, resolve_blocks

    blocks = section(blocks, "blocks", BlocksConfig)
    if blocks.targets:
        return resolve_blocks(list(blocks.targets), family)
    if not is_preset(blocks.preset, family):
        raise ConfigError(f"blocks.preset={blocks.preset!r} — valid: {', '.join(PRESET_NAMES)}, "
                          "or a custom list blocks.targets=[...]")
    return resolve_blocks(blocks.preset, family)


def check_optimizer(optim: DictConfig) -> None:
    """The optimizer class must import (bitsandbytes for adamw8bit)."""
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


def check_data(data: DictConfig) -> tuple[DataConfig, list[str]]:
    """Typed data settings and the shard list; every local shard exists."""
    from data_tools.shards import expand_shards

    if OmegaConf.is_missing(data, "shards"):
        raise ConfigError("data.shards is required, e.g. data.shards='DIR/*.tar' (python -m data_tools.synthetic "
                          "--out DIR --num 64 makes some)")
    typed = section(data, "data", DataConfig)
    try:
        urls = expand_shards(typed.shards)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise ConfigError(f"data.shards: {missing[0]} does not exist ({len(missing)} of {len(urls)} shards missing)")
    return typed, urls


def check_resume(resume: Any, output_dir: str) -> None:
    """resume is auto, none, or a checkpoint folder."""
    if resume in ("auto", "none", None):
        return
    if not Path(str(resume), "trainer_state.json").is_file():
        raise ConfigError(f"resume={resume}: not a complete checkpoint folder (no trainer_state.json); "
                          f"use resume=auto, resume=none or a path like {output_dir}/checkpoints/checkpoint-00001000")


def check_model(model_cfg: DictConfig, blocks: DictConfig) -> str | None:
    """The base exists, the target blocks exist in its UNet, the image encoder fits; returns the family."""
    import torch
    from diffusers import UNet2DConditionModel

    from instantstyle.blocks import UnknownBlockError, select_layers
    from instantstyle.content import ContentSpaceMismatch
    from instantstyle.models import BaseModelError, model_family

    model = section(model_cfg, "model", ModelConfig)
    if model.build_if_missing and not Path(model.path, "unet").is_dir():
        return None  # the tiny base is built on first use; it always fits
    try:
        unet_cfg = UNet2DConditionModel.load_config(model.path, subfolder="unet")
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_cfg)
        family = model_family(unet)
        select_layers(list(unet.attn_processors), target_blocks(blocks, family))
        _check_image_encoder(model, family)
        return family
    except (UnknownBlockError, ContentSpaceMismatch, BaseModelError) as err:
        raise ConfigError(str(err)) from err
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path={model.path}: cannot read the base model ({str(err).splitlines()[0]})") from err


def _check_image_encoder(model: ModelConfig, family: str) -> None:
    from transformers import CLIPTextConfig, CLIPVisionConfig

    from instantstyle.content import check_content_space
    from instantstyle.models import resolve_image_encoder

    enc_path, enc_sub = resolve_image_encoder(model.path, model.image_encoder)
    kwargs = {"subfolder": enc_sub} if enc_sub else {}
    vision = CLIPVisionConfig.from_pretrained(enc_path, **kwargs)
    if model.check_content_space:
        sub = "text_encoder_2" if family == "sdxl" else "text_encoder"
        text = CLIPTextConfig.from_pretrained(model.path, subfolder=sub)
        check_content_space(vision.projection_dim, text.projection_dim if family == "sdxl" else text.hidden_size)


def read_validation(v: ValidationConfig, adapter_type: str) -> tuple[tuple[str, ...], list]:
    """(prompts, style references) of an enabled validation; the styles fit the content scale."""
    from instantstyle.evaluate import load_references, read_prompts
    from instantstyle.pipeline import GenerationError

    if v.styles is None:
        return (), []
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
    if isinstance(v.prompts, str):
        try:
            return tuple(read_prompts(v.prompts)), refs
        except GenerationError as err:
            raise ConfigError(f"validation.prompts: {err}") from err
    prompts = list(v.prompts or [])
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("validation.prompts is required: a text file (one prompt per line) or a list of prompts")
    return tuple(prompts), refs


def check_config(cfg: DictConfig) -> Settings:
    """Check the whole config; returns the typed, read ``Settings`` or raises ``ConfigError``."""
    for key in ("output_dir", "model", "adapter", "blocks", "data", "optim", "logger", "trainer"):
        if key not in cfg or OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"config has no {key!r}: compose configs/train.yaml (python -m train ...)")
    check_known_keys(cfg)
    trainer = resolve_precision(section(cfg.trainer, "trainer", TrainerConfig))  # "auto" → no/fp16/bf16
    adapter_type = str(cfg.adapter.type)
    for name, schema in (("adapter", AdapterConfig), ("logger", LoggerConfig), ("optim", OptimConfig)):
        section(cfg[name], name, schema)  # their range checks
    validation = section(cfg.get("validation"), "validation", ValidationConfig)
    prompts, refs = read_validation(validation, adapter_type)
    check_optimizer(cfg.optim)
    data, urls = check_data(cfg.data)
    check_resume(cfg.resume, str(cfg.output_dir))
    family = check_model(cfg.model, cfg.blocks)
    init_from = cfg.adapter.get("init_from")
    if init_from and not glob.glob(str(init_from)):
        raise ConfigError(f"adapter.init_from={init_from}: file not found")
    if trainer.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
    return Settings(trainer, data, urls, validation, prompts, refs, family)


def validate_config(cfg: DictConfig) -> TrainerConfig:
    """Check the whole config; returns the typed trainer section or raises ``ConfigError``."""
    return check_config(cfg).trainer
