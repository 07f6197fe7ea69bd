"""``Run``: everything the loop touches, and the named parts a checkpoint holds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from instantstyle.adapter import InstantStyleAdapter
from instantstyle.models import BaseModel
from train.checkpoint import RankState, Stateful
from train.checks import Settings
from train.config import TrainerConfig, ValidationConfig
from train.data import TrainLoader
from train.ema import EMA
from train.task import DiffusionTask


@dataclass
class Run:
    """A training run, built and (maybe) resumed; ``parts`` is exactly what a checkpoint saves and restores."""

    accelerator: Accelerator
    settings: Settings
    base: BaseModel
    adapter: InstantStyleAdapter
    model: nn.Module
    task: DiffusionTask
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: TrainLoader
    generator: torch.Generator
    ema: EMA | None
    run_dir: Path
    config_yaml: str
    identity: dict
    step: int = 0
    summary: dict = field(default_factory=dict)
    probe_batch: dict | None = None  # the last batch that trained finitely: train.divergence probes weights on it

    @property
    def trainer(self) -> TrainerConfig:
        return self.settings.trainer

    @property
    def validation(self) -> ValidationConfig:
        return self.settings.validation

    def parts(self) -> dict[str, Stateful]:
        """The states every rank shares, by name: saved by rank 0, restored on every rank."""
        parts: dict[str, Stateful] = {"adapter": self.adapter, "optimizer": self.optimizer,
                                      "lr_scheduler": self.lr_scheduler}
        if self.ema is not None:
            parts["ema"] = self.ema
        return parts

    def rank_part(self) -> RankState:
        """This rank's own state (RNG streams, data position), gathered into the checkpoint's ``ranks``."""
        return RankState(self.generator, self.loader)

    def record(self, batch: dict) -> None:
        """Append the batch's sample keys to RUN/sample_keys/rank{r}.txt when asked (resume/DDP checks)."""
        if self.trainer.record_sample_keys:
            folder = self.run_dir / "sample_keys"
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"rank{self.accelerator.process_index}.txt", "a") as f:
                f.write("".join(f"{self.step + 1} {key}\n" for key in batch["keys"]))

    def fixed_batch_loader(self) -> TrainLoader:
        """A separate, single-process loader whose first batch is the fixed validation batch."""
        from train.data import build_train_loader

        return build_train_loader(self.settings.data, batch_size=self.trainer.batch_size,
                                  seed=self.trainer.seed + 1, rank=0, world_size=1, urls=self.settings.shard_urls)
