"""``python -m train [hydra overrides]``: compose configs/train.yaml and train."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from train.checkpoint import CheckpointError
from train.config import ConfigError
from train.loop import NonFiniteLoss

# Mistakes a user can fix: one line on stderr and exit 2, no traceback.
USER_ERRORS = (ConfigError, CheckpointError, NonFiniteLoss)


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from train.training import train

    try:
        train(cfg)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
