"""The training loop: accumulate, backward, clip, step, log, checkpoint. The math is in ``train.task``."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from tqdm.auto import tqdm

from instantstyle.evaluate import EvalConfig, EvalSetting, StyleReference, evaluate_adapter
from instantstyle.generate import StyleGenerator
from train.checkpoint import CheckpointManager, capture_rng, gather_json, restore_rng, save_parts
from train.loggers import ThroughputMeter
from train.run import Run
from train.task import DiffusionTask

log = logging.getLogger(__name__)


class StopSignal:
    """SIGTERM/SIGINT (preemption) ask for a checkpoint at the next step boundary, then a clean exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, _frame) -> None:
        log.warning("received signal %d: checkpointing at the next step boundary, then exiting", signum)
        self.requested = True

    def agreed(self, accelerator: Accelerator) -> bool:
        """True on every rank when any rank was signalled (they must checkpoint together)."""
        flag = torch.tensor([float(self.requested)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def save_checkpoint(run: Run, manager: CheckpointManager) -> None:
    """Gather every rank's own state; only the main process writes."""
    ranks = gather_json(run.rank_part().state_dict(), run.accelerator)
    if run.accelerator.is_main_process:
        trainer_state = {"step": run.step, "identity": run.identity,
                         "samples_seen": sum(r["data"]["samples_seen"] for r in ranks)}
        path = save_parts(manager, run.step, run.parts(), ranks, trainer_state, run.config_yaml)
        log.info("saved %s", path)
    run.accelerator.wait_for_everyone()


@torch.no_grad()
def fixed_batch_loss(run: Run, batch: dict, seed: int = 0) -> float:
    """Loss on one fixed batch with fixed noise: comparable across steps and runs."""
    generator = torch.Generator(run.accelerator.device).manual_seed(seed)
    model = run.accelerator.unwrap_model(run.model)
    task = DiffusionTask(run.base, model, adapter_type=run.task.adapter_type, generator=generator,
                         noise_offset=run.task.noise_offset, snr_gamma=run.task.snr_gamma,
                         clip_mean=run.task.clip_mean, clip_std=run.task.clip_std)  # datascale: same pixel normalisation
    return float(task(batch)[0])


@contextmanager
def training_state_kept(run: Run) -> Iterator[None]:
    """Put back what generation changes (RNG streams, adapter scales), so validation never alters training."""
    rng = capture_rng(run.generator)  # torch CPU/CUDA, numpy, python and the task's noise generator
    scales = [proc.scale for proc in run.adapter.layers]
    try:
        yield
    finally:
        restore_rng(rng, run.generator)
        for proc, scale in zip(run.adapter.layers, scales):
            proc.scale = scale


def evaluate_live(run: Run, refs: list[StyleReference], out_dir: Path) -> dict[str, float | None]:
    """Metric means of the adapter as it is now; writes metrics.json, metrics.md and grid.png to ``out_dir``."""
    v = run.validation
    # The live weights, not EMA: they are what the loss curve describes, and swapping EMA in and out
    # would be one more thing to restore exactly. Export EMA and run instantstyle.evaluate for it.
    model = run.accelerator.unwrap_model(run.model)
    generator = StyleGenerator.from_base(run.base, model.adapter)  # shares the training UNet, restores it after
    config = EvalConfig(list(run.settings.prompts), list(v.seeds), v.steps, height=v.height, width=v.width)
    # Autocast as in training: frozen nets in the training precision, adapter weights in fp32.
    with torch.no_grad(), run.accelerator.autocast():
        return evaluate_adapter(generator, refs, config, out_dir, EvalSetting(content_scale=v.content_scale))


def log_grid(accelerator: Accelerator, path: Path, step: int) -> None:
    """The grid to the trackers that take images (TensorBoard, wandb); none configured = nothing."""
    image = np.asarray(Image.open(path).convert("RGB"))
    # accelerator.trackers rather than get_tracker(name), which raises for a tracker that is not configured.
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"val/grid": image[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"val/grid": [image]}, step=step)


def validate(run: Run, refs: list[StyleReference] | None) -> None:
    """Evaluate on the main process and log; the other ranks wait at a barrier."""
    acc = run.accelerator
    if acc.is_main_process:
        out_dir = run.run_dir / "eval" / f"step-{run.step:08d}"
        with training_state_kept(run):
            means = evaluate_live(run, refs, out_dir)
        acc.log({f"val/{k}": v for k, v in means.items() if v is not None}, step=run.step)
        log_grid(acc, out_dir / "grid.png", run.step)
        run.summary["validation"] = {"step": run.step, **means}
        log.info("step %d validation: %s (%s)", run.step, means, out_dir)
    acc.wait_for_everyone()


def validation_due(run: Run) -> bool:
    """Every ``validation.every`` steps and at the last step."""
    v = run.validation
    return v.enabled and (run.step % v.every == 0 or run.step == run.trainer.max_steps)


def train_step(run: Run, batches, meter: ThroughputMeter) -> tuple[float, float]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches; (loss, grad norm)."""
    accelerator, losses = run.accelerator, []
    for _ in range(run.trainer.gradient_accumulation_steps):
        with meter.waiting():
            batch = next(batches)
        run.record(batch)
        with accelerator.accumulate(run.model):
            loss, _metrics = run.task(batch)
            accelerator.backward(loss)
        losses.append(loss.detach())
    # accumulate() has synced gradients on the last micro-batch.
    max_norm = run.trainer.max_grad_norm or float("inf")
    grad_norm = accelerator.clip_grad_norm_(run.adapter.parameters(), max_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.adapter)
    return float(torch.stack(losses).mean()), float(grad_norm)


def log_metrics(run: Run, meter: ThroughputMeter, grad_norm: float, bar) -> dict:
    """Average the window over ranks and send it to the trackers; returns what was logged."""
    acc = run.accelerator
    window = meter.read()
    loss = acc.reduce(torch.tensor([window["loss"]], device=acc.device), reduction="mean").item()
    skipped = {}
    for stats in gather_json(run.loader.stats(), acc):
        for key, value in stats.items():
            if key.startswith("data/skipped/"):
                skipped[key] = skipped.get(key, 0) + value
    metrics = {"train/loss": loss, "train/lr": run.lr_scheduler.get_last_lr()[0], "train/grad_norm": grad_norm,
               "perf/samples_per_s": window["samples_per_s"], "perf/data_wait_frac": window["data_wait_frac"],
               **skipped}
    acc.log(metrics, step=run.step)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['train/lr']:.2e}")
    return metrics


def fit(run: Run, manager: CheckpointManager) -> dict:
    """Train from ``run.step`` to ``max_steps``; stops early (after a checkpoint) on SIGTERM/SIGINT."""
    t, acc = run.trainer, run.accelerator
    samples_per_step = t.batch_size * t.gradient_accumulation_steps * acc.num_processes
    stop, meter, batches = StopSignal(), ThroughputMeter(), iter(run.loader)
    fixed_batch = next(iter(run.fixed_batch_loader())) if t.validate_every and acc.is_main_process else None
    refs = run.settings.references if run.validation.enabled and acc.is_main_process else None
    bar = tqdm(total=t.max_steps, initial=run.step, desc="train", disable=not acc.is_main_process)
    start, first_step, metrics, preempted = time.perf_counter(), run.step, {}, False
    try:
        while run.step < t.max_steps:
            loss, grad_norm = train_step(run, batches, meter)
            run.step += 1
            meter.add(samples_per_step, loss)
            bar.update(1)
            if run.step % t.log_every == 0 or run.step == t.max_steps:
                metrics = log_metrics(run, meter, grad_norm, bar)
            if fixed_batch is not None and run.step % t.validate_every == 0:
                acc.log({"val/fixed_batch_loss": fixed_batch_loss(run, fixed_batch)}, step=run.step)
            preempted = stop.agreed(acc)
            if preempted or (t.checkpoint_every and run.step % t.checkpoint_every == 0) or run.step == t.max_steps:
                save_checkpoint(run, manager)
            if preempted:
                break
            if validation_due(run):  # after the checkpoint: a failing evaluation loses no training
                validate(run, refs)
    finally:
        stop.restore()
        bar.close()
    elapsed = time.perf_counter() - start
    run.summary.update({"step": run.step, "max_steps": t.max_steps, "preempted": preempted,
                        "final_loss": metrics.get("train/loss"), "wall_s": elapsed,
                        "samples_per_s": (run.step - first_step) * samples_per_step / max(elapsed, 1e-9),
                        "samples_seen": run.step * samples_per_step, "world_size": acc.num_processes})
    return run.summary
