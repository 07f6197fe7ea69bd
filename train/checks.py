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
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from train.config import (
    GROUPS,
    SHARDS_REQUIRED,
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

log = logging.getLogger(__name__)


@dataclass
class Settings:
    """The config, typed and checked: all that training reads once ``check_config`` has run."""

    model: ModelConfig
    adapter: AdapterConfig
    blocks: BlocksConfig
    data: DataConfig
    optim: OptimConfig
    logger: LoggerConfig
    trainer: TrainerConfig
    validation: ValidationConfig
    output_dir: str
    resume: str | None
    shard_urls: list[str] = field(default_factory=list)
    prompts: tuple[str, ...] = ()
    references: list = field(default_factory=list)  # instantstyle.evaluate.StyleReference, read once
    family: str | None = None  # the base's model family; None until the tiny base is built
    target_blocks: list[str] | None = None  # the resolved block prefixes; None until the tiny base is built
    metric_encoders: dict = field(default_factory=dict)  # optional validation metrics (CSD, DINO), loaded once

    def record(self) -> dict:
        """The settings as one plain mapping: RUN/config.yaml, each checkpoint's copy, the trackers' hyperparameters."""
        groups = {name: asdict(getattr(self, name)) for name in GROUPS}
        return {**groups, "output_dir": self.output_dir, "resume": self.resume}


def target_blocks(blocks: Any, family: str) -> list[str]:
    """Block prefixes for ``blocks`` (custom ``targets`` win over the preset; ``all`` = ALL_BLOCKS)."""
    from instantstyle.blocks import PRESET_NAMES, is_preset, resolve_blocks

    if family == "flux":  # double_blocks.K names, no measured presets (train/flux_builders.py)
        from train.flux_builders import flux_target_blocks

        return flux_target_blocks(blocks)
    blocks = section(blocks, "blocks", BlocksConfig)
    if blocks.targets:
        return resolve_blocks(list(blocks.targets), family)
    if not is_preset(blocks.preset, family):
        raise ConfigError(f"blocks.preset={blocks.preset!r} — valid: {', '.join(PRESET_NAMES)}, "
                          "or a custom list blocks.targets=[...]")
    return resolve_blocks(blocks.preset, family)


def check_optimizer(optim: OptimConfig) -> None:
    """The optimizer class must import (bitsandbytes for adamw8bit)."""
    target = optim._target_
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
    from data_tools.shards import local_shard_problem
    from train.data_checks import check_buckets, expand_data_shards, log_bucket_histogram

    if OmegaConf.is_missing(data, "shards"):
        raise ConfigError(SHARDS_REQUIRED)
    typed = section(data, "data", DataConfig)
    urls = expand_data_shards(typed.shards)
    problems = [p for p in map(local_shard_problem, urls) if p]
    if problems:
        raise ConfigError(f"data.shards: {problems[0]} ({len(problems)} of {len(urls)} shards unusable)")
    if not typed.cached:
        from train.cached_data import check_not_a_cache

        check_not_a_cache(urls)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if typed.num_workers > cpus:  # more decoding processes than CPUs only adds contention (and torch's warning)
        log.info("data.num_workers=%d > %d CPUs here: using %d workers", typed.num_workers, cpus, cpus)
        typed.num_workers = cpus
    if not typed.cached:  # a cache's buckets were chosen when it was made
        log_bucket_histogram(check_buckets(typed), urls)
    return typed, urls


def check_resume(resume: Any, output_dir: str) -> None:
    """resume is auto, none, or a checkpoint folder."""
    if resume in ("auto", "none", None):
        return
    if not Path(str(resume), "trainer_state.json").is_file():
        raise ConfigError(f"resume={resume}: not a complete checkpoint folder (no trainer_state.json); "
                          f"use resume=auto, resume=none or a path like {output_dir}/checkpoints/checkpoint-00001000")


def check_output_dir(output_dir: str) -> None:
    """The run folder is a writable folder, or can be made as one, outside /proc, /sys and /dev."""
    from instantstyle.errors import OutputPathError
    from instantstyle.safe_paths import check_output_dir as check_folder

    try:
        check_folder(output_dir, f"output_dir={output_dir}")
    except OutputPathError as err:
        raise ConfigError(str(err)) from None


def check_model(model_cfg: ModelConfig | DictConfig, blocks: BlocksConfig | DictConfig,
                clip_image_size: int) -> tuple[str | None, list[str] | None]:
    """The base exists, the target blocks exist in its UNet, the image encoder fits; (family, blocks)."""
    import torch
    from diffusers import UNet2DConditionModel

    from instantstyle.blocks import UnknownBlockError, select_layers
    from instantstyle.content import ContentSpaceMismatch
    from instantstyle.models import BaseModelError, model_family
    from train.builders import resolve_model_path, unreadable_base

    model = section(model_cfg, "model", ModelConfig)
    given = Path(model.path).expanduser()
    if given.exists() and not given.is_dir():  # a file, or a device such as /dev/null
        raise ConfigError(f"model.path={model.path} is a file, not a folder; give the base model's diffusers folder "
                          "(with unet/) or a hub id")
    path = resolve_model_path(model.path, must_exist=not model.build_if_missing)
    if model.build_if_missing and not Path(path, "unet").is_dir():
        return None, None  # the tiny base is built on first use; it always fits
    try:
        unet_cfg = UNet2DConditionModel.load_config(path, subfolder="unet")
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_cfg)
        family = model_family(unet)
        chosen = target_blocks(blocks, family)
        select_layers(list(unet.attn_processors), chosen)
        _check_image_encoder(model, path, family, clip_image_size)
        return family, chosen
    except ConfigError:
        raise
    except (UnknownBlockError, ContentSpaceMismatch, BaseModelError) as err:
        raise ConfigError(str(err)) from err
    except (OSError, ValueError) as err:
        raise unreadable_base(model.path, model.image_encoder, "base model", err) from err


def check_family_model(settings: Settings) -> tuple[str | None, list[str] | None]:
    """``check_model`` for UNet bases; FLUX bases have their own checks (train/flux_builders.py)."""
    from train.flux_builders import check_flux_config, is_flux

    if is_flux(settings.model):
        return check_flux_config(settings)
    return check_model(settings.model, settings.blocks, settings.data.clip_image_size)


def _check_image_encoder(model: ModelConfig, path: str, family: str, clip_image_size: int) -> None:
    from transformers import CLIPTextConfig, CLIPVisionConfig

    from instantstyle.content import check_content_space
    from instantstyle.models import resolve_image_encoder

    enc_path, enc_sub = resolve_image_encoder(path, model.image_encoder)
    kwargs = {"subfolder": enc_sub} if enc_sub else {}
    vision = CLIPVisionConfig.from_pretrained(enc_path, **kwargs)
    if vision.image_size != clip_image_size:  # else a shape error deep in the first step, after loading
        raise ConfigError(f"data.clip_image_size={clip_image_size}, but the image encoder of model.path={model.path} "
                          f"takes {vision.image_size} px: set data.clip_image_size={vision.image_size}")
    if model.check_content_space:
        sub = "text_encoder_2" if family == "sdxl" else "text_encoder"
        text = CLIPTextConfig.from_pretrained(path, subfolder=sub)
        check_content_space(vision.projection_dim, text.projection_dim if family == "sdxl" else text.hidden_size)


def read_validation(v: ValidationConfig, adapter_type: str) -> tuple[tuple[str, ...], list]:
    """(prompts, style references) of an enabled validation; the styles fit the content scale."""
    if v.styles is None:
        return (), []
    from instantstyle.evaluate import load_references, read_prompts  # the diffusers pipelines: only when needed
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
    if isinstance(v.prompts, str):
        try:
            return tuple(read_prompts(v.prompts)), refs
        except GenerationError as err:
            raise ConfigError(f"validation.prompts: {err}") from err
    prompts = list(v.prompts or [])
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("validation.prompts is required: a text file (one prompt per line) or a list of prompts")
    return tuple(prompts), refs


def load_validation_encoders(v: ValidationConfig) -> dict:
    """The optional CSD and DINO metric encoders of an enabled validation (one line when a path is wrong)."""
    if v.styles is None or not (v.csd or v.dino):
        return {}
    from instantstyle.errors import GenerationError
    from instantstyle.evaluate import load_metric_encoders

    try:
        return load_metric_encoders(v.csd, v.dino)
    except GenerationError as err:
        raise ConfigError(f"validation.csd/dino: {err}") from err


def check_config(cfg: DictConfig, load_metric_encoders: bool = True) -> Settings:
    """Check the whole config; returns the typed, read ``Settings`` or raises ``ConfigError``.

    ``load_metric_encoders=False`` (``train.preflight``) leaves validation's CSD/DINO encoders unloaded.
    """
    for key in ("output_dir", "model", "adapter", "blocks", "data", "optim", "logger", "trainer"):
        if key not in cfg or OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"config has no {key!r}: compose configs/train.yaml (python -m train ...)")
    check_known_keys(cfg)
    output_dir = str(cfg.output_dir)
    check_output_dir(output_dir)
    trainer = resolve_precision(section(cfg.trainer, "trainer", TrainerConfig))  # "auto" → no/fp16/bf16
    model, adapter, blocks, logger, optim = (section(cfg[name], name, GROUPS[name])  # their range checks
                                             for name in ("model", "adapter", "blocks", "logger", "optim"))
    if trainer.content_scale and adapter.type != "ip_adapter":
        raise ConfigError(f"trainer.content_scale={trainer.content_scale} needs adapter=ip_adapter ({adapter.type} "
                          "reads the image encoder's hidden states, which are not in the text space)")
    validation = section(cfg.get("validation"), "validation", ValidationConfig)
    prompts, refs = read_validation(validation, adapter.type)
    encoders = load_validation_encoders(validation) if load_metric_encoders else {}
    check_optimizer(optim)
    data, urls = check_data(cfg.data)
    resume = None if cfg.resume in (None, "none") else str(cfg.resume)  # one spelling of "fresh"
    check_resume(resume, output_dir)
    settings = Settings(model, adapter, blocks, data, optim, logger, trainer, validation, output_dir, resume,
                        urls, prompts, refs, metric_encoders=encoders)
    settings.family, settings.target_blocks = check_family_model(settings)
    if data.cached:  # the embedding cache must fit the model family, base, adapter and data config
        from instantstyle.models import locate_base
        from train.cached_data import check_cache

        # The base as it resolves (model=toy from any folder), as precompute recorded it.
        check_cache(data, urls, model_path=locate_base(model.path), image_encoder=model.image_encoder,
                    adapter_type=adapter.type, family=settings.family)
    if adapter.init_from and not glob.glob(adapter.init_from):
        raise ConfigError(f"adapter.init_from={adapter.init_from}: file not found")
    if trainer.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("trainer.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
    return settings
