"""``python -m train [hydra overrides]``: compose configs/train.yaml and train.

Only Hydra, OmegaConf, ``train.config`` and ``train.preflight`` are imported here: ``--help``, ``--cfg job``
and a config mistake answer in about a second; torch and diffusers load when training starts.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from train.config import CONFIG_DIR, ConfigError
from train.preflight import last_value, precheck, quote_shards, report_error


def run_dir_follows_output_dir(argv: list[str]) -> list[str]:
    """``output_dir=RUN`` also moves Hydra's run dir there, so .hydra/ and train_rank0.log land in RUN."""
    given = last_value(argv, "output_dir")
    if given is not None and last_value(argv, "hydra.run.dir") is None:
        return [*argv, f"hydra.run.dir={given}"]
    return argv


def set_cpu_threads(cfg: DictConfig) -> None:
    """The library's CPU thread choice (instantstyle.threads), said as the run log's first line."""
    from instantstyle.threads import available_cpus, configure_cpu_threads

    # Every rank on this machine and its data workers (at most one per CPU) compete for the cores.
    workers = min(int(cfg.data.get("num_workers", 0)), available_cpus())
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) * (1 + workers)
    logging.getLogger("train").info(configure_cpu_threads(processes))


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Hydra's entry: train as ``cfg`` says; a mistake the user can fix is one line and exit 2."""
    from train.sweep_points import hand_over_to_launch_sh

    handed_over = hand_over_to_launch_sh(cfg.output_dir)  # a cluster sweep point on several GPUs or nodes
    if handed_over is not None:
        sys.exit(handed_over)
    from instantstyle.quiet import quiet_libraries

    quiet_libraries(quantizing=cfg.model.get("quantize", "none") != "none")
    set_cpu_threads(cfg)
    import torch
    from hydra.errors import InstantiationException

    from instantstyle.errors import AdapterFileError, OutputPathError
    from train.checkpoint import CheckpointError
    from train.divergence import DivergedWeights
    from train.loop import NonFiniteLoss
    from train.training import train

    try:
        train(cfg)
    except (ConfigError, CheckpointError, NonFiniteLoss, DivergedWeights, AdapterFileError, OutputPathError) as err:
        report_error(err)
        sys.exit(2)
    except InstantiationException as err:  # a builder failed on a value the checks could not foresee
        cause = err.__cause__ or err
        report_error((str(cause).splitlines() or [type(cause).__name__])[0])
        sys.exit(2)
    except (MemoryError, torch.OutOfMemoryError):  # host RAM or the GPU's
        report_error("out of memory: lower trainer.batch_size or data.resolution, or raise "
                     "trainer.gradient_accumulation_steps")
        sys.exit(2)


if __name__ == "__main__":
    sys.argv[1:] = quote_shards(sys.argv[1:])
    from train.errors import CheckpointError

    try:  # every rank composes (one line per mistake); only the first says what the data implies
        implied = precheck(sys.argv[1:], say=os.environ.get("RANK", "0") == "0")
    except (ConfigError, CheckpointError) as err:
        report_error(err)
        sys.exit(2)
    sys.argv[1:] = run_dir_follows_output_dir(sys.argv[1:] + implied)
    main()
