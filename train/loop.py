"""The training loop: accumulate, backward, clip, step, log, checkpoint. The math is in ``train.task``."""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from tqdm.auto import tqdm

from instantstyle.evaluate import EvalConfig, EvalSetting, StyleReference, evaluate_adapter
from instantstyle.generate import StyleGenerator
from train.checkpoint import (FINITE_HINT, LATER_PARTS, CheckpointManager, capture_rng, gather_json, restore_rng,
                              save_parts)
from train.cached_validation import encoders_on
from train.compiling import uncompiled
from train.divergence import check_weights
from train.loggers import FILE_ONLY, ThroughputMeter, append_history, format_duration, keep_window_lines_off_console
from train.run import Run
from train.sharding import is_sharded

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


class ValidationStopped(Exception):
    """A rank was signalled while the main process generated validation images."""


class StopGate:
    """Lock-step stop votes while the main process works alone, so every rank hears of a signal within one UNet call.

    The main process votes before each UNet call of its validation and once more when done; the other
    ranks vote in a loop until that last vote. No rank sits in one long collective: a preemption that
    lands anywhere is agreed on within one denoising step, and no wait nears the collective timeout.
    """

    def __init__(self, stop: StopSignal, accelerator: Accelerator) -> None:
        self.stop, self.accelerator = stop, accelerator

    def _vote(self, done: bool) -> tuple[bool, bool]:
        flags = torch.tensor([float(self.stop.requested), float(done)], device=self.accelerator.device)
        total = self.accelerator.reduce(flags, reduction="sum").tolist()
        return total[0] > 0, total[1] > 0

    def tick(self, *_args) -> None:
        """Main process, between UNet calls: raise ``ValidationStopped`` when any rank was signalled."""
        if self._vote(done=False)[0]:
            raise ValidationStopped

    def finish(self) -> bool:
        """Main process, last vote: whether any rank was signalled."""
        return self._vote(done=True)[0]

    def wait(self) -> bool:
        """Other ranks: vote until the main process is done; whether any rank was signalled."""
        while True:
            stopped, done = self._vote(done=False)
            if done:
                return stopped

    @contextmanager
    def ticking(self, unet: torch.nn.Module) -> Iterator[None]:
        """Vote before every forward of ``unet`` inside the block (before FSDP gathers a sharded UNet's weights)."""
        handle = unet.register_forward_pre_hook(self.tick, prepend=True)
        try:
            yield
        finally:
            handle.remove()


def save_checkpoint(run: Run, manager: CheckpointManager, preempted: bool = False) -> None:
    """Gather every rank's own state; only the main process writes (never inf/NaN weights).

    On preemption the adapter, schedule, RNG and data position are written (and renamed into place)
    before the optimizer and EMA, so a usable checkpoint exists early in the 30 s before SIGKILL.
    """
    check_weights(run, f"checkpoint at step {run.step}")  # on every rank, so all stop together
    ranks = gather_json(run.rank_part().state_dict(), run.accelerator)
    if run.accelerator.is_main_process:
        trainer_state = {"step": run.step, "identity": run.identity,
                         "samples_seen": sum(r["data"]["samples_seen"] for r in ranks)}
        later = LATER_PARTS if preempted else ()
        path = save_parts(manager, run.step, run.parts(), ranks, trainer_state, run.config_yaml, later=later)
        log.info("saved %s", path)
    run.accelerator.wait_for_everyone()
    run.summary["checkpoint_step"] = run.step


@torch.no_grad()
def fixed_batch_loss(run: Run, batch: dict, seed: int = 0) -> float:
    """Loss on one fixed batch with fixed noise: comparable across steps and runs."""
    generator = torch.Generator(run.accelerator.device).manual_seed(seed)
    model = run.accelerator.unwrap_model(run.model)
    with uncompiled(model):  # no_grad would recompile the training graph for one batch per interval
        return float(run.task.using(generator, model)(batch)[0])


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


def evaluate_live(run: Run, refs: list[StyleReference], out_dir: Path | None) -> dict[str, float | None]:
    """Metric means of the adapter as it is now; writes metrics.json, metrics.md and grid.png to ``out_dir``."""
    v = run.validation
    # The live weights, not EMA: they are what the loss curve describes, and swapping EMA in and out
    # would be one more thing to restore exactly. Export EMA and run instantstyle.evaluate for it.
    model = run.accelerator.unwrap_model(run.model)
    generator = StyleGenerator.from_base(run.base, model.adapter)  # shares the training UNet, restores it after
    config = EvalConfig(list(run.settings.prompts), list(v.seeds), v.steps, height=v.height, width=v.width)
    # Autocast as in training: frozen nets in the training precision, adapter weights in fp32; but the
    # VAE decodes outside it, in its own dtype (fp32 in fp16 runs: SDXL's VAE overflows in fp16).
    # Eager: the images' shapes, CFG batch and no_grad would each recompile a compiled UNet, for a few calls.
    with torch.no_grad(), run.accelerator.autocast(), decoding_outside_autocast(run.base.vae), uncompiled(model), \
            validation_encoders_on(run):
        return evaluate_adapter(generator, refs, config, out_dir, EvalSetting(content_scale=v.content_scale),
                                encoders=run.settings.metric_encoders)


def validation_encoders_on(run: Run) -> AbstractContextManager:
    """A cached run's encoders wait in host memory and come to the device for validation only."""
    return encoders_on(run.base, run.accelerator.device) if run.settings.data.cached else nullcontext()


@contextmanager
def decoding_outside_autocast(vae: torch.nn.Module) -> Iterator[None]:
    """Inside the block ``vae.decode`` runs with autocast off, in the VAE's own dtype."""
    decode = vae.decode

    def own_dtype_decode(latents: torch.Tensor, *args, **kwargs):
        with torch.autocast(latents.device.type, enabled=False):
            return decode(latents.to(vae.dtype), *args, **kwargs)

    vae.decode = own_dtype_decode  # an instance attribute shadows the method until deleted
    try:
        yield
    finally:
        del vae.decode


def log_grid(accelerator: Accelerator, path: Path, step: int) -> None:
    """The grid to the trackers that take images (TensorBoard, wandb); none configured = nothing."""
    image = np.asarray(Image.open(path).convert("RGB"))
    # accelerator.trackers rather than get_tracker(name), which raises for a tracker that is not configured.
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"val/grid": image[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"val/grid": [image]}, step=step)


def validate(run: Run, refs: list[StyleReference] | None, stop: StopSignal) -> bool:
    """Evaluate on the main process and log while the other ranks vote; True when a stop signal cut it short.

    With a sharded UNet every rank generates the same images (each UNet call gathers weights from all);
    only the main process writes and logs them.
    """
    gate, main = StopGate(stop, run.accelerator), run.accelerator.is_main_process
    if not (main or is_sharded(run.model)):
        return gate.wait()
    try:
        with training_state_kept(run), gate.ticking(run.base.unet):
            means = evaluate_live(run, refs, run.run_dir / "eval" / f"step-{run.step:08d}" if main else None)
        if main:
            report_validation(run, means)
    except ValidationStopped:
        log.warning("step %d validation stopped by a signal; its report is not written", run.step)
    finally:
        stopped = gate.finish()  # also on an error, so the other ranks leave their vote loop
    return stopped


def report_validation(run: Run, means: dict[str, float | None]) -> None:
    """Validation means and grid to the trackers, the summary and the log."""
    out_dir = run.run_dir / "eval" / f"step-{run.step:08d}"
    run.accelerator.log({f"val/{k}": v for k, v in means.items() if v is not None}, step=run.step)
    log_grid(run.accelerator, out_dir / "grid.png", run.step)
    run.summary["validation"] = {"step": run.step, **means}
    log.info("step %d validation: %s (%s)", run.step, means, out_dir)


def validation_due(run: Run) -> bool:
    """Every ``validation.every`` steps (0: with each checkpoint) and at the last step."""
    v = run.validation
    every = v.every or run.trainer.checkpoint_every
    return v.enabled and (run.step == run.trainer.max_steps or bool(every and run.step % every == 0))


class NonFiniteLoss(RuntimeError):
    """Too many optimizer steps in a row had an inf/NaN loss or gradient norm; the message is one line."""


def train_step(run: Run, batches, meter: ThroughputMeter) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches; (loss, grad norm, finite).

    Loss and grad norm stay device tensors, read only every ``log_every`` steps. The one host sync per
    step is the skip decision (a bool): a non-finite loss or gradient norm skips the step, and the
    schedule and EMA stay put (fp16's GradScaler makes the same per-step decision for its own skips).
    """
    accelerator, losses = run.accelerator, []
    for _ in range(run.trainer.gradient_accumulation_steps):
        with meter.waiting():
            batch = next(batches)
        run.record(batch)
        with accelerator.accumulate(run.model):
            loss, _metrics = run.task(batch)
            accelerator.backward(loss)
        losses.append(loss.detach())
    # accumulate() has synced gradients on the last micro-batch (a sharded model averages its own).
    if is_sharded(run.model):
        run.model.average_gradients()
    max_norm = run.trainer.max_grad_norm or float("inf")
    grad_norm = torch.as_tensor(accelerator.clip_grad_norm_(run.adapter.parameters(), max_norm))
    mean_loss = torch.stack(losses).mean()
    # The loss is an MSE through the prediction, so a rank's inf/NaN loss makes the all-reduced gradients
    # non-finite on every rank: all ranks skip together. fp16's grad scaler judges overflowing gradients itself.
    ok = torch.isfinite(mean_loss) if accelerator.scaler is not None else torch.isfinite(mean_loss + grad_norm)
    finite = bool(ok)
    if finite:
        run.probe_batch = batch  # trained finitely with the weights before this step (train.divergence)
        run.optimizer.step()
        advance_after_step(run)
    run.optimizer.zero_grad(set_to_none=True)
    return mean_loss, grad_norm, finite


def advance_after_step(run: Run) -> bool:
    """Schedule and EMA move only when the optimizer did (the fp16 GradScaler skips steps with inf gradients)."""
    if run.accelerator.optimizer_step_was_skipped:
        log.warning("step %d: inf/NaN gradients in fp16, optimizer step skipped (loss scale lowered)", run.step + 1)
        return False
    run.lr_scheduler.step()
    if run.ema is not None:
        run.ema.update(run.adapter)
    return True


def count_nonfinite(run: Run, finite: bool, in_row: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> int:
    """Count a skipped step; NonFiniteLoss after ``trainer.max_nonfinite_steps`` in a row. Returns the streak."""
    if finite:
        return 0
    in_row += 1
    run.summary["skipped_nonfinite"] = run.summary.get("skipped_nonfinite", 0) + 1
    log.warning("step %d: loss %s, gradient norm %s: optimizer step skipped (%d in a row)",
                run.step, float(loss), float(grad_norm), in_row)
    if in_row >= run.trainer.max_nonfinite_steps:
        raise NonFiniteLoss(f"{in_row} steps in a row had an inf/NaN loss or gradient norm (up to step {run.step}), "
                            f"each skipped; stopping: {FINITE_HINT}")
    return in_row


def log_metrics(run: Run, meter: ThroughputMeter, grad_norm: torch.Tensor, bar) -> dict:
    """Average the window over ranks and send it to the trackers; returns what was logged (the only host sync)."""
    acc = run.accelerator
    window = meter.read()  # its loss is the mean of the window's device tensors
    loss_t = torch.as_tensor(window["loss"], dtype=torch.float32, device=acc.device).reshape(1)
    loss = acc.reduce(loss_t, reduction="mean").item()
    skipped = {}
    for stats in gather_json(run.loader.stats(), acc):
        for key, value in stats.items():
            if key.startswith("data/skipped/"):
                skipped[key] = skipped.get(key, 0) + value
    metrics = {"train/loss": loss, "train/lr": run.lr_scheduler.get_last_lr()[0], "train/grad_norm": grad_norm.item(),
               "train/skipped_nonfinite": run.summary.get("skipped_nonfinite", 0),
               "perf/samples_per_s": window["samples_per_s"], "perf/data_wait_frac": window["data_wait_frac"],
               **skipped}
    acc.log(metrics, step=run.step)
    if acc.is_main_process:  # whatever the logger: train.sweep reads the curve from here
        append_history(run.run_dir, {"step": run.step, **metrics})
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{metrics['train/lr']:.2e}")
    if acc.is_main_process:  # the run log keeps every window, whatever the trackers; a shown bar keeps the console
        log.info(window_line(run, metrics), extra={FILE_ONLY: not bar.disable})
    return metrics


def window_line(run: Run, metrics: dict) -> str:
    """'step 20/400 loss 0.1234 grad norm 0.51 lr 3.00e-03 | 75.2 samples/s, data wait 3% | skipped 0 samples,
    0 steps | ETA 4m 13s': one logging window in the run log."""
    t = run.trainer
    skipped = sum(v for k, v in metrics.items() if k.startswith("data/skipped/"))
    samples_per_step = t.batch_size * t.gradient_accumulation_steps * run.accelerator.num_processes
    eta = (t.max_steps - run.step) * samples_per_step / max(metrics["perf/samples_per_s"], 1e-9)
    return (f"step {run.step}/{t.max_steps} loss {metrics['train/loss']:.4f} grad norm {metrics['train/grad_norm']:.3g} "
            f"lr {metrics['train/lr']:.2e} | {metrics['perf/samples_per_s']:.1f} samples/s, "
            f"data wait {metrics['perf/data_wait_frac']:.0%} | skipped {skipped} samples, "
            f"{metrics['train/skipped_nonfinite']} steps | ETA {format_duration(eta)}")


def checkpoint_due(run: Run) -> bool:
    """Every ``checkpoint_every`` steps and at the last step."""
    t = run.trainer
    return bool(t.checkpoint_every and run.step % t.checkpoint_every == 0) or run.step == t.max_steps


def stop_agreed(run: Run, stop: StopSignal, force: bool = False) -> bool:
    """The ranks' vote on a stop signal, every ``stop_check_every`` steps (a host sync) or when ``force``d."""
    return (force or run.step % run.trainer.stop_check_every == 0) and stop.agreed(run.accelerator)


def fit(run: Run, manager: CheckpointManager) -> dict:
    """Train from ``run.step`` to ``max_steps``; stops early (after a checkpoint) on SIGTERM/SIGINT."""
    t, acc = run.trainer, run.accelerator
    samples_per_step = t.batch_size * t.gradient_accumulation_steps * acc.num_processes
    stop, meter, batches = StopSignal(), ThroughputMeter(), iter(run.loader)
    generates = acc.is_main_process or is_sharded(run.model)  # a sharded UNet runs only on all ranks together
    fixed_batch = next(iter(run.fixed_batch_loader())) if t.validate_every and generates else None
    refs = run.settings.references if run.validation.enabled and generates else None
    # A bar redraws one line with \r: in a redirected log (sbatch, nohup, CI) that is one huge line.
    show_bar = acc.is_main_process and sys.stderr.isatty()
    if show_bar:
        keep_window_lines_off_console()
    bar = tqdm(total=t.max_steps, initial=run.step, desc="train", disable=not show_bar)
    start, first_step, metrics, preempted, nonfinite = time.perf_counter(), run.step, {}, False, 0
    run.summary.setdefault("skipped_nonfinite", 0)
    try:
        while run.step < t.max_steps and not preempted:
            loss, grad_norm, finite = train_step(run, batches, meter)
            run.step += 1
            nonfinite = count_nonfinite(run, finite, nonfinite, loss, grad_norm)
            meter.add(samples_per_step, loss)
            bar.update(1)
            if run.step % t.log_every == 0 or run.step == t.max_steps:
                metrics = log_metrics(run, meter, grad_norm, bar)
            if fixed_batch is not None and run.step % t.validate_every == 0:
                acc.log({"val/fixed_batch_loss": fixed_batch_loss(run, fixed_batch)}, step=run.step)
            preempted = step_boundary(run, manager, stop, refs)
    finally:
        stop.restore()
        bar.close()
    elapsed = time.perf_counter() - start
    run.summary.update({"step": run.step, "max_steps": t.max_steps, "preempted": preempted,
                        "final_loss": metrics.get("train/loss"), "wall_s": elapsed,
                        "samples_per_s": (run.step - first_step) * samples_per_step / max(elapsed, 1e-9),
                        "samples_seen": run.step * samples_per_step, "world_size": acc.num_processes})
    return run.summary


def step_boundary(run: Run, manager: CheckpointManager, stop: StopSignal, refs: list | None) -> bool:
    """Checkpoint and validate when due; True when the ranks agreed to stop (a checkpoint of this step exists).

    A signal may land in the middle of a checkpoint write or a validation: both are followed by a
    vote, and a stop never rewrites the checkpoint this step already has.
    """
    due = checkpoint_due(run)
    preempted = stop_agreed(run, stop, force=due)
    if due or preempted:
        save_checkpoint(run, manager, preempted=preempted)
        preempted = preempted or stop_agreed(run, stop, force=True)  # signalled during the write
    if not preempted and validation_due(run):  # after the checkpoint: a failing evaluation loses no training
        preempted = validate(run, refs, stop)
        if preempted and run.summary.get("checkpoint_step") != run.step:
            save_checkpoint(run, manager, preempted=True)
    return preempted
