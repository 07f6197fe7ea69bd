"""No checkpoint or export holds weights that diverged: non-finite ones, or finite ones that make the loss so.

A loss of inf/NaN skips its step, but the step *before* it may already have moved the weights
to 1e30: finite, and black on every image. So before anything is written the weights are probed:
one no-grad forward, with fixed noise, on the last batch whose step trained finitely. That batch
gave a finite loss with the previous weights; an inf/NaN loss now can only come from the weights.
The probe needs no threshold, costs one forward per checkpoint, and touches no RNG the loop uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from train.checkpoint import FINITE_HINT, check_finite
from train.compiling import uncompiled
from train.run import Run

log = logging.getLogger(__name__)


class DivergedWeights(RuntimeError):
    """The weights about to be written give an inf/NaN loss; the message is one line."""


def probe_loss(run: Run, batch: dict, seed: int = 0) -> torch.Tensor:
    """The loss of the current weights on ``batch`` with fixed noise (RNG streams put back afterwards)."""
    from train.checkpoint import capture_rng, restore_rng

    rng = capture_rng(run.generator)
    try:
        generator = torch.Generator(run.accelerator.device).manual_seed(seed)
        model = run.accelerator.unwrap_model(run.model)
        # Eager: under no_grad a compiled UNet would recompile its training graph for this one batch.
        with torch.no_grad(), run.accelerator.autocast(), uncompiled(model):
            return run.task.using(generator, model)(batch)[0].detach().float()
    finally:
        restore_rng(rng, run.generator)


@contextmanager
def weights_swapped(module: torch.nn.Module, weights: Mapping[str, torch.Tensor] | None) -> Iterator[None]:
    """``module`` holds ``weights`` inside the block (nothing changes for None), its own ones after."""
    if weights is None:
        yield
        return
    own = {k: v.detach().clone() for k, v in module.state_dict().items()}
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in weights.items()})
    try:
        yield
    finally:
        module.load_state_dict(own)


def largest_weight(module: torch.nn.Module) -> float:
    """The largest absolute parameter value (what the message reports)."""
    return max((float(p.detach().abs().max()) for p in module.parameters() if p.numel()), default=0.0)


def check_weights(run: Run, what: str) -> None:
    """Raise ``DivergedWeights`` (every rank together) when the weights ``what`` would write have diverged.

    The live adapter is probed, and the EMA weights too when there are any: they are what an export holds.
    """
    check_finite(run.parts(), what)  # inf/NaN anywhere, optimizer state included: a CheckpointError
    batch = run.probe_batch
    candidates = [("adapter", None)] + ([("EMA", run.ema.shadow)] if run.ema is not None else [])
    bad = []
    for name, weights in candidates:
        with weights_swapped(run.adapter, weights):
            finite = batch is None or bool(torch.isfinite(probe_loss(run, batch)))
            if not finite:
                bad.append(f"{name} weights (largest |weight| {largest_weight(run.adapter):.3g})")
    flag = torch.tensor([float(bool(bad))], device=run.accelerator.device)
    if run.accelerator.reduce(flag, reduction="sum").item() > 0:  # a rank's probe failed: all ranks stop
        which = bad[0] if bad else "weights"
        raise DivergedWeights(f"refusing to write the {what}: the {which} give an inf/NaN loss on a batch that "
                              f"trained finitely; the training diverged at or before step {run.step} "
                              f"({FINITE_HINT})")
