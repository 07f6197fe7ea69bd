"""``train(cfg)``: check, build, resume, run the loop, export. Tests call it with a composed config."""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from instantstyle.export import export_safetensors
from instantstyle.models import BaseModel
from train.checkpoint import CheckpointManager, check_compatible, load_parts
from train.checks import Settings, check_config, target_blocks
from train.config import TrainerConfig, resolve_precision
from train.data import build_train_loader
from train.ema import EMA
from train.loggers import Trackers, loggable_config
from train.optim import build_lr_scheduler, build_optimizer
from train.run import Run
from train.sharding import shard_frozen_unet, take_over_sharding, whole_unet
from train.task import AdaptedUNet, DiffusionTask, rank_seed

log = logging.getLogger(__name__)
EXPORT_NAME = "ip-adapter.safetensors"


def make_accelerator(trainer: TrainerConfig, trackers: Trackers, run_dir: Path) -> Accelerator:
    """Accelerate owns devices, DDP wrapping, autocast and trackers."""
    # Ranks wait in collectives while one rank downloads the base or writes a checkpoint: the default
    # 10 minutes is too short for a first SDXL download on a slow link.
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=trainer.collective_timeout_s))
    return Accelerator(
        mixed_precision=resolve_precision(trainer).mixed_precision,
        gradient_accumulation_steps=trainer.gradient_accumulation_steps,
        log_with=trackers.log_with or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False), timeout],
    )


def enable_tf32(trainer: TrainerConfig) -> bool:
    """TF32 matmuls and convolutions on CUDA when ``trainer.allow_tf32``; returns whether it is on."""
    on = trainer.allow_tf32 and torch.cuda.is_available()
    if on:  # fp32 parts (adapter, VAE, the whole UNet with mixed_precision=no) use tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return on


def check_distributed(backend: str | None, num_processes: int) -> bool:
    """Whether to shard the frozen UNet (``ACCELERATE_CONFIG=fsdp`` on several processes); says what runs."""
    if backend == "DEEPSPEED":
        # ZeRO-2 would partition only the adapter's optimizer state (tens of MB) and hide it in DeepSpeed's
        # pickled checkpoints; data parallelism keeps them exact and pickle-free at the same memory.
        log.warning("ACCELERATE_CONFIG=deepspeed_zero2: the adapter is too small for ZeRO-2 to save memory; "
                    "training runs data parallel (use ACCELERATE_CONFIG=fsdp to shard the frozen base)")
    return backend == "FSDP" and num_processes > 1


def load_base_once(cfg: DictConfig, accelerator: Accelerator, dtype: torch.dtype) -> BaseModel:
    """Each node's first process first, so a missing tiny base (or a download) is made once per node.

    Per node, not global rank 0: on several machines each has its own disk and Hugging Face cache.
    """
    with accelerator.local_main_process_first():
        return instantiate(cfg.model, dtype=dtype, device=accelerator.device)


def speed_up_unet(unet: torch.nn.Module, trainer: TrainerConfig) -> None:
    """``trainer.channels_last`` (NHWC weights) and ``trainer.compile`` (torch.compile, in place)."""
    if trainer.channels_last:
        unet.to(memory_format=torch.channels_last)
    if trainer.compile:
        unet.compile()  # in place: state-dict names, hooks and the pipeline's reference stay the same


def prepare_model(unet: torch.nn.Module, adapter: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  accelerator: Accelerator, shard: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """DDP-wrapped UNet + adapter, or (FSDP) the UNet sharded by ``train.sharding`` and only the optimizer prepared."""
    if not shard:
        return accelerator.prepare(AdaptedUNet(unet, adapter), optimizer)
    model = shard_frozen_unet(unet, adapter, accelerator.device, accelerator.autocast)
    return model, accelerator.prepare(optimizer)


def build_run(cfg: DictConfig, settings: Settings, accelerator: Accelerator, run_dir: Path,
              shard: bool = False) -> Run:
    """Frozen base, adapter, optimizer, schedule, EMA, data: the whole run, before resuming."""
    trainer = settings.trainer
    set_seed(trainer.seed)  # same adapter init on every rank
    base = load_base_once(cfg, accelerator, trainer.weight_dtype)
    if trainer.mixed_precision == "fp16":
        base.vae.to(torch.float32)  # SDXL's VAE overflows in fp16
    if trainer.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
    adapter = instantiate(cfg.adapter)(base, blocks=target_blocks(cfg.blocks, base.family))
    speed_up_unet(base.unet, trainer)  # after the adapter, so its processors are compiled with the UNet
    optimizer = build_optimizer(cfg.optim, adapter.parameters())
    lr_scheduler = build_lr_scheduler(optimizer, trainer)
    model, optimizer = prepare_model(base.unet, adapter, optimizer, accelerator, shard)
    rank, world = accelerator.process_index, accelerator.num_processes
    generator = torch.Generator(accelerator.device).manual_seed(rank_seed(trainer.seed, rank))
    task = DiffusionTask(base, model, adapter_type=adapter.spec.adapter_type, generator=generator,
                         noise_offset=trainer.noise_offset, snr_gamma=trainer.snr_gamma)
    loader = build_train_loader(settings.data, batch_size=trainer.batch_size, seed=trainer.seed, rank=rank,
                                world_size=world, urls=settings.shard_urls)
    identity = {**adapter.spec.to_metadata(), "world_size": world}
    return Run(accelerator, settings, base, adapter, model, task, optimizer, lr_scheduler, loader, generator,
               EMA(adapter, trainer.ema) if trainer.ema else None, run_dir, OmegaConf.to_yaml(cfg, resolve=True),
               identity)


def checkpoint_to_resume(resume: str | None, manager: CheckpointManager) -> Path | None:
    """auto = newest complete checkpoint (None when there is none), none = fresh, else that folder."""
    if resume in (None, "none"):
        return None
    return manager.latest() if resume == "auto" else Path(resume)


def restore(run: Run, folder: Path) -> None:
    """Load the checkpoint into the run's parts, after checking the checkpoint fits it."""
    trainer_state = json.loads((folder / "trainer_state.json").read_text())
    check_compatible(trainer_state["identity"], run.identity, folder)
    load_parts(folder, run.parts(), run.accelerator.process_index, run.rank_part())
    if run.ema is not None and not (folder / "ema.json").is_file():  # killed before the EMA was written
        run.ema = EMA(run.adapter, run.ema.decay)
    run.step = int(trainer_state["step"])
    run.summary["resumed_from"] = str(folder)
    log.info("resumed from %s at step %d", folder, run.step)


def export_final(run: Run) -> Path:
    """``RUN/ip-adapter.safetensors`` (EMA weights when EMA is on)."""
    if run.ema is not None:
        run.ema.copy_to(run.adapter)
    return export_safetensors(run.adapter, run.base.unet, run.run_dir / EXPORT_NAME, dtype="fp32", step=run.step)


def train(cfg: DictConfig) -> Run:
    """Train an adapter as ``cfg`` says; returns the finished run (its ``summary`` is also on disk)."""
    from train.loop import fit

    settings = check_config(cfg)
    run_dir = Path(cfg.output_dir)
    trackers = instantiate(cfg.logger, run_dir=str(run_dir))
    backend = take_over_sharding()  # before the Accelerator, which then runs data parallel underneath
    accelerator = make_accelerator(settings.trainer, trackers, run_dir)
    enable_tf32(settings.trainer)
    run = build_run(cfg, settings, accelerator, run_dir, shard=check_distributed(backend, accelerator.num_processes))
    manager = CheckpointManager(run_dir / "checkpoints", settings.trainer.checkpoints_to_keep)
    folder = checkpoint_to_resume(cfg.resume, manager)
    if folder is not None:
        restore(run, folder)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(run.config_yaml)
    accelerator.init_trackers(trackers.project, config=loggable_config(cfg), init_kwargs=trackers.init_kwargs)
    fit(run, manager)
    if not run.summary.get("preempted"):
        with whole_unet(run.model):  # FSDP: the export copies untrained layers' weights from the UNet
            if accelerator.is_main_process:
                run.summary["export"] = str(export_final(run))
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(run.summary, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run
