"""``train(cfg)``: check, build, resume, run the loop, export. Tests call it with a composed config."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs
from accelerate.utils import ProjectConfiguration, set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open

from instantstyle.models import BaseModel
from instantstyle.safe_paths import write_atomic
from train.checkpoint import (CheckpointError, CheckpointManager, check_compatible, gather_json, load_parts,
                              verify_checkpoint)
from train.checks import Settings, check_config, target_blocks
from train.cached_validation import HOST, park_encoders
from train.compiling import choose_cudnn_benchmark, compile_denoiser
from train.config import DataConfig, ModelConfig, TrainerConfig, resolve_precision
from train.data import build_train_loader
from train.ema import EMA
from train.families import adapted_model, adapter_identity, denoiser, export_adapter, task_for
from train.loggers import Trackers, loggable_config
from train.optim import build_lr_scheduler, build_optimizer
from train.record import EXPORT_FOLDER, EXPORT_NAME, link_weights, model_ids, share_run
from train.run import Run
from train.run_lock import RunLock
from train.sharding import shard_frozen_base, take_over_sharding, whole_unet
from train.task import rank_seed

log = logging.getLogger(__name__)


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
    """Whether to shard the frozen network: ``ACCELERATE_CONFIG=fsdp`` on several processes."""
    return backend == "FSDP" and num_processes > 1


def load_base_once(model: ModelConfig, accelerator: Accelerator, dtype: torch.dtype, encoders: bool = True,
                   device: torch.device | None = None) -> BaseModel:
    """Each node's first process first, so a missing tiny base (or a download) is made once per node.

    Per node, not global rank 0: on several machines each has its own disk and Hugging Face cache.
    """
    with accelerator.local_main_process_first():
        return instantiate(model, dtype=dtype, device=device or accelerator.device, encoders=encoders)


def fixed_shapes(data: DataConfig) -> bool:
    """Every training batch has one shape: no aspect-ratio buckets (or a single one)."""
    buckets = data.buckets
    return str(buckets).lower() == "none" if isinstance(buckets, str) else len(buckets) == 1


def load_frozen_base(settings: Settings, accelerator: Accelerator) -> BaseModel:
    """The base as the data needs it: every encoder for live encoding; for an embedding cache the UNet on the
    device, plus (when validation makes images) the encoders in host memory, moved in for validation only."""
    cached, validates = settings.data.cached, settings.validation.enabled
    if not cached or not validates:  # an embedding cache without validation needs the UNet only
        return load_base_once(settings.model, accelerator, settings.trainer.weight_dtype, encoders=not cached)
    base = load_base_once(settings.model, accelerator, settings.trainer.weight_dtype, encoders=True, device=HOST)
    park_encoders(base)
    base.unet.to(accelerator.device)
    return base


def prepare_model(base: BaseModel, adapter: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  accelerator: Accelerator, shard: bool,
                  compile_unet: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """DDP-wrapped base + adapter, or (FSDP) the UNet sharded by ``train.sharding`` and only the optimizer prepared.

    ``compile_unet`` compiles the denoiser last, so a sharded UNet's FSDP hooks stay outside the compiled blocks.
    """
    if not shard:
        model, optimizer = accelerator.prepare(adapted_model(base, adapter), optimizer)
    else:
        model = shard_frozen_base(base, adapter, accelerator.device, accelerator.autocast)
        optimizer = accelerator.prepare(optimizer)
    if compile_unet:  # after the adapter is installed, so its processors are compiled with the UNet
        compile_denoiser(denoiser(base), sharded=shard)
    return model, optimizer


def build_run(settings: Settings, accelerator: Accelerator, run_dir: Path, shard: bool = False) -> Run:
    """Frozen base, adapter, optimizer, schedule, EMA, data: the whole run, before resuming."""
    trainer = settings.trainer
    set_seed(trainer.seed)  # same adapter init on every rank
    base = load_frozen_base(settings, accelerator)
    if trainer.mixed_precision == "fp16":
        base.vae.to(torch.float32)  # SDXL's VAE overflows in fp16
    if trainer.gradient_checkpointing:
        denoiser(base).enable_gradient_checkpointing()
    blocks = settings.target_blocks if settings.target_blocks is not None else target_blocks(settings.blocks,
                                                                                              base.family)
    adapter = instantiate(settings.adapter)(base, blocks=blocks)
    if trainer.channels_last:  # NHWC weights: faster convolutions on tensor cores
        denoiser(base).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(settings.optim, adapter.parameters())
    lr_scheduler = build_lr_scheduler(optimizer, trainer)
    model, optimizer = prepare_model(base, adapter, optimizer, accelerator, shard, compile_unet=trainer.compile)
    rank, world = accelerator.process_index, accelerator.num_processes
    generator = torch.Generator(accelerator.device).manual_seed(rank_seed(trainer.seed, rank))
    task = task_for(base, model, adapter, generator, settings)
    loader = build_train_loader(settings.data, batch_size=trainer.batch_size, seed=trainer.seed, rank=rank,
                                world_size=world, urls=settings.shard_urls)
    # The configured base, not the path it resolved to: a run resumed from another folder is the same run.
    identity = {**adapter_identity(base, adapter), "base_model": settings.model.path, "world_size": world}
    return Run(accelerator, settings, base, adapter, model, task, optimizer, lr_scheduler, loader, generator,
               EMA(adapter, trainer.ema) if trainer.ema else None, run_dir, OmegaConf.to_yaml(settings.record()),
               identity)


def choose_checkpoint(resume: str | None, manager: CheckpointManager) -> dict:
    """The main process's choice as JSON: ``folder`` (a name under ``manager.root``, or a path) and its ``step``.

    auto = the newest checkpoint that reads completely (older ones after a broken one), none = fresh,
    else that folder, which must read completely.
    """
    if resume in (None, "none"):
        return {"folder": None, "step": 0}
    if resume != "auto":
        folder = Path(resume).resolve()
        return {"folder": str(folder), "step": verify_checkpoint(folder)["step"]}
    folder = manager.newest_usable()  # read completely already: only its step is needed
    if folder is None:
        return {"folder": None, "step": 0}
    return {"folder": folder.name, "step": json.loads((folder / "trainer_state.json").read_text())["step"]}


@dataclass
class ResumePoint:
    """Where every rank starts: a checkpoint folder (None = fresh) at ``step``; ``done`` = nothing left to do."""

    folder: Path | None
    step: int = 0
    done: bool = False


def checkpoint_to_resume(resume: str | None, manager: CheckpointManager, accelerator: Accelerator,
                         decide: Callable[[], dict] | None = None) -> ResumePoint:
    """The checkpoint every rank resumes from: rank 0 chooses, every rank checks it sees the same one.

    ``decide`` (main process only) replaces ``choose_checkpoint`` when the choice involves more (the run
    lock, a finished run). A CheckpointError on any rank is raised on every rank, so none is left
    waiting in a collective for one that quit.
    """
    choice, error = None, None
    if accelerator.is_main_process:
        try:
            choice = decide() if decide is not None else choose_checkpoint(resume, manager)
        except CheckpointError as err:
            error = str(err)
    choice, error = gather_json([choice, error], accelerator)[0]  # JSON bytes in a tensor: no pickle
    if error:
        raise CheckpointError(error)
    folder = None if choice["folder"] is None else manager.root / choice["folder"]  # a path stays a path
    problem = None
    if folder is not None and not accelerator.is_main_process:
        try:
            verify_checkpoint(folder, step=choice["step"])
        except CheckpointError as err:
            problem = f"rank {accelerator.process_index} cannot resume from {folder} (step {choice['step']}), " \
                      f"which rank 0 chose: {err}; output_dir must be one folder every node shares"
    problems = [p for p in gather_json(problem, accelerator) if p]
    if problems:
        raise CheckpointError(problems[0])
    return ResumePoint(folder, choice["step"], bool(choice.get("done")))


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
    """``RUN/export/`` to share (weights, model card, training record, samples) and ``RUN/ip-adapter.safetensors``.

    Both hold the same weights (EMA weights when EMA is on); the second is a hard link, written last.
    """
    if run.ema is not None:
        run.ema.copy_to(run.adapter)
    cfg, folder = OmegaConf.create(run.config_yaml), run.run_dir / EXPORT_FOLDER
    ids = model_ids(cfg, run.base.path, run.base.image_encoder_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = export_adapter(run.base.family, denoiser(run.base), run.adapter, folder / EXPORT_NAME, dtype="fp32",
                          step=run.step, ids=ids)
    share_run(run, cfg, ids, folder)
    return link_weights(path, run.run_dir / EXPORT_NAME)


def exported_step(path: Path) -> int | None:
    """The step recorded in an export's header, or None when there is no readable export."""
    try:
        with safe_open(str(path), "pt") as f:
            return int((f.metadata() or {}).get("step", ""))
    except (OSError, ValueError, SafetensorError):
        return None


def claim_run_dir(lock: RunLock, manager: CheckpointManager, resume: str | None, max_steps: int) -> dict:
    """Main process: lock RUN, clear a dead run's temp folders, choose the checkpoint, and see if the run is done."""
    lock.acquire()
    manager.remove_stale_tmp()  # under the lock, every tmp- folder is a killed run's
    choice = choose_checkpoint(resume, manager)
    # Done = the export is the one the newest checkpoint at max_steps made; anything else resumes (and re-exports).
    step = choice["step"]
    choice["done"] = (resume == "auto" and choice["folder"] is not None and step >= max_steps
                      and exported_step(manager.root.parent / EXPORT_NAME) == step)
    return choice


def train(cfg: DictConfig) -> Run | None:
    """Train an adapter as ``cfg`` says; returns the finished run (its ``summary`` is also on disk).

    None when ``output_dir`` already holds this run finished (resume=auto): nothing is trained again.
    """
    settings = check_config(cfg)  # from here on, only the typed settings are read
    run_dir = Path(settings.output_dir)
    trackers = instantiate(settings.logger, run_dir=str(run_dir))
    backend = take_over_sharding()  # before the Accelerator, which then runs data parallel underneath
    accelerator = make_accelerator(settings.trainer, trackers, run_dir)
    enable_tf32(settings.trainer)
    choose_cudnn_benchmark(fixed_shapes(settings.data))
    shard = check_distributed(backend, accelerator.num_processes)
    manager = CheckpointManager(run_dir / "checkpoints", settings.trainer.checkpoints_to_keep)
    lock = RunLock(run_dir)  # held by the main process until train returns (or the process dies)
    try:
        start = checkpoint_to_resume(settings.resume, manager, accelerator, lambda: claim_run_dir(
            lock, manager, settings.resume, settings.trainer.max_steps))
        if start.done:
            log.info("already done: %s (step %d)", run_dir / EXPORT_NAME, start.step)
            return None
        return run_training(settings, accelerator, trackers, manager, start.folder, shard)
    finally:
        lock.release()


def run_training(settings: Settings, accelerator: Accelerator, trackers: Trackers, manager: CheckpointManager,
                 folder: Path | None, shard: bool = False) -> Run:
    """Build, resume, fit and export, once ``train`` holds the output_dir."""
    from train.divergence import check_weights
    from train.loop import fit

    run_dir = manager.root.parent
    run = build_run(settings, accelerator, run_dir, shard=shard)
    if folder is not None:
        restore(run, folder)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.yaml", run.config_yaml, "run config")  # never through a planted symlink
    accelerator.init_trackers(trackers.project, config=loggable_config(settings.record()),
                              init_kwargs=trackers.init_kwargs)
    fit(run, manager)
    if not run.summary.get("preempted"):
        check_weights(run, "export")  # on every rank, so they stop together
        with whole_unet(run.model):  # FSDP: the export copies untrained layers' weights from the UNet
            if accelerator.is_main_process:
                run.summary["export"] = str(export_final(run))
    if accelerator.is_main_process:
        write_atomic(run_dir / "summary.json", json.dumps(run.summary, indent=2), "run summary")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        log.info(closing_line(run))
    return run


def closing_line(run: Run) -> str:
    """The run log's last line: what was exported, or where a stopped run resumes from."""
    if run.summary.get("preempted"):
        return (f"stopped at step {run.step}; checkpoint {run.run_dir / 'checkpoints'}; "
                "run the same command again to resume")
    return f"done: step {run.step}, exported {run.summary['export']}"
