"""Optimizer (the ``optim`` group, instantiated with the adapter's parameters) and lr schedule."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.optimization import get_scheduler
from hydra.utils import instantiate
from torch.optim.lr_scheduler import LambdaLR

from train.config import OptimConfig, TrainerConfig

# Our schedule names -> diffusers' (every one warms up linearly first).
SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def build_optimizer(optim: OptimConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Instantiate the configured optimizer over ``params`` (only the adapter's)."""
    return instantiate(optim)(list(params))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, trainer: TrainerConfig) -> LambdaLR:
    """Warmup then constant/cosine/linear decay over ``trainer.max_steps`` optimizer steps."""
    return get_scheduler(SCHEDULES[trainer.lr_scheduler], optimizer, num_warmup_steps=trainer.warmup_steps,
                         num_training_steps=trainer.max_steps)
