"""``train(cfg)``: validate, build, resume, run the loop, export. Tests call it with a composed config."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from instantstyle.adapter import InstantStyleAdapter
from instantstyle.export import export_safetensors
from instantstyle.models import BaseModel
from train.checkpoint import (
    CheckpointManager,
    capture_rng,
    check_compatible,
    load_checkpoint,
    restore_rng,
)
from train.config import (
    TrainerConfig,
    ValidationConfig,
    check_distributed,
    target_blocks,
    validate_config,
    validation_config,
)
from train.ema import EMA
from train.loggers import Trackers, loggable_config
from train.optim import build_lr_scheduler, build_optimizer
from train.task import AdaptedUNet, DiffusionTask, rank_seed

log = logging.getLogger(__name__)
EXPORT_NAME = "ip-adapter.safetensors"


@dataclass
class Run:
    """Everything the loop touches; the stateful parts are exactly what a checkpoint holds."""

    accelerator: Accelerator
    trainer: TrainerConfig
    base: BaseModel
    adapter: InstantStyleAdapter
    model: nn.Module
    task: DiffusionTask
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: object
    data_cfg: DictConfig
    generator: torch.Generator
    ema: EMA | None
    run_dir: Path
    config_yaml: str
    identity: dict
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    step: int = 0
    summary: dict = field(default_factory=dict)

    def states(self) -> dict:
        """Checkpoint content shared by all ranks (per-rank RNG and data state are gathered separately)."""
        states = {"adapter": self.adapter.state_dict(), "optimizer": self.optimizer.state_dict(),
                  "lr_scheduler": self.lr_scheduler.state_dict()}
        if self.ema is not None:
            states["ema"] = self.ema.state_dict()
        return states

    def record(self, batch: dict) -> None:
        """Append the batch's sample keys to RUN/sample_keys/rank{r}.txt when asked (resume/DDP checks)."""
        if self.trainer.record_sample_keys:
            folder = self.run_dir / "sample_keys"
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"rank{self.accelerator.process_index}.txt", "a") as f:
                f.write("".join(f"{self.step + 1} {key}\n" for key in batch["keys"]))

    def fixed_batch_loader(self):
        """A separate, single-process loader whose first batch is the fixed validation batch."""
        from train.data import build_train_loader

        return build_train_loader(self.data_cfg, batch_size=self.trainer.batch_size, seed=self.trainer.seed + 1,
                                  rank=0, world_size=1)

    def rank_state(self) -> dict:
        """This rank's RNG streams and data position."""
        return {"rng": capture_rng(self.generator), "data": self.loader.state_dict()}


def make_accelerator(trainer: TrainerConfig, trackers: Trackers, run_dir: Path) -> Accelerator:
    """Accelerate owns devices, DDP wrapping, autocast and trackers."""
    return Accelerator(
        mixed_precision=trainer.mixed_precision, gradient_accumulation_steps=trainer.gradient_accumulation_steps,
        log_with=trackers.log_with or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )


def load_base_once(cfg: DictConfig, accelerator: Accelerator, dtype: torch.dtype) -> BaseModel:
    """Main process first, so a missing tiny base (or a download) is made once, not per rank."""
    with accelerator.main_process_first():
        return instantiate(cfg.model, dtype=dtype, device=accelerator.device)


def build_run(cfg: DictConfig, trainer: TrainerConfig, accelerator: Accelerator, run_dir: Path) -> Run:
    """Frozen base, adapter, optimizer, schedule, EMA, data: the whole run, before resuming."""
    from train.data import build_train_loader

    set_seed(trainer.seed)  # same adapter init on every rank
    base = load_base_once(cfg, accelerator, trainer.weight_dtype)
    if trainer.mixed_precision == "fp16":
        base.vae.to(torch.float32)  # SDXL's VAE overflows in fp16
    if trainer.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    blocks = target_blocks(cfg.blocks, base.family)
    adapter = instantiate(cfg.adapter)(base, blocks=blocks)
    optimizer = build_optimizer(cfg.optim, adapter.parameters())
    lr_scheduler = build_lr_scheduler(optimizer, trainer)
    model, optimizer = accelerator.prepare(AdaptedUNet(base.unet, adapter), optimizer)
    rank, world = accelerator.process_index, accelerator.num_processes
    generator = torch.Generator(accelerator.device).manual_seed(rank_seed(trainer.seed, rank))
    task = DiffusionTask(base, model, adapter_type=adapter.spec.adapter_type, generator=generator,
                         noise_offset=trainer.noise_offset, snr_gamma=trainer.snr_gamma)
    loader = build_train_loader(cfg.data, batch_size=trainer.batch_size, seed=trainer.seed, rank=rank, world_size=world)
    spec = adapter.spec
    identity = {"base_model": str(cfg.model.path), "target_blocks": list(blocks) if blocks is not None else "all",
                "adapter_type": spec.adapter_type, "num_tokens": spec.num_tokens, "world_size": world,
                "image_embed_dim": spec.image_embed_dim, "resampler_dim": spec.resampler_dim,
                "image_encoder": base.image_encoder_path}
    return Run(accelerator, trainer, base, adapter, model, task, optimizer, lr_scheduler, loader, cfg.data, generator,
               EMA(adapter, trainer.ema) if trainer.ema else None, run_dir, OmegaConf.to_yaml(cfg, resolve=True),
               identity)


def checkpoint_to_resume(resume: str | None, manager: CheckpointManager) -> Path | None:
    """auto = newest complete checkpoint (None when there is none), none = fresh, else that folder."""
    if resume in (None, "none"):
        return None
    return manager.latest() if resume == "auto" else Path(resume)


def restore(run: Run, folder: Path) -> None:
    """Load every saved state into the run, after checking the checkpoint fits it."""
    states, trainer_state = load_checkpoint(folder, ["adapter", "optimizer", "lr_scheduler", "ema", "ranks"])
    check_compatible(trainer_state["identity"], run.identity, folder)
    run.adapter.load_state_dict(states["adapter"])
    run.optimizer.load_state_dict(states["optimizer"])
    run.lr_scheduler.load_state_dict(states["lr_scheduler"])
    if run.ema is not None and "ema" in states:
        run.ema.load_state_dict(states["ema"])
    mine = states["ranks"][run.accelerator.process_index]
    restore_rng(mine["rng"], run.generator)
    run.loader.load_state_dict(mine["data"])
    run.step = int(trainer_state["step"])
    run.summary["resumed_from"] = str(folder)
    log.info("resumed from %s at step %d", folder, run.step)


def export_final(run: Run, cfg: DictConfig) -> Path:
    """``RUN/ip-adapter.safetensors`` (EMA weights when EMA is on)."""
    if run.ema is not None:
        run.ema.copy_to(run.adapter)
    return export_safetensors(run.adapter, run.base.unet, run.run_dir / EXPORT_NAME, dtype="fp32",
                              base_model=str(cfg.model.path), image_encoder=run.base.image_encoder_path,
                              step=run.step)


def train(cfg: DictConfig) -> Run:
    """Train an adapter as ``cfg`` says; returns the finished run (its ``summary`` is also on disk)."""
    from train.loop import fit

    trainer = validate_config(cfg)
    run_dir = Path(cfg.output_dir)
    trackers = instantiate(cfg.logger, run_dir=str(run_dir))
    accelerator = make_accelerator(trainer, trackers, run_dir)
    check_distributed(str(accelerator.distributed_type).split(".")[-1])
    run = build_run(cfg, trainer, accelerator, run_dir)
    run.validation = validation_config(cfg.get("validation"), cfg.adapter.type)  # checked by validate_config
    manager = CheckpointManager(run_dir / "checkpoints", trainer.checkpoints_to_keep)
    folder = checkpoint_to_resume(cfg.resume, manager)
    if folder is not None:
        restore(run, folder)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(run.config_yaml)
    accelerator.init_trackers(trackers.project, config=loggable_config(cfg), init_kwargs=trackers.init_kwargs)
    fit(run, manager)
    if accelerator.is_main_process and not run.summary.get("preempted"):
        run.summary["export"] = str(export_final(run, cfg))
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(run.summary, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run
