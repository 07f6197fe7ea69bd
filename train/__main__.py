"""``python -m train [hydra overrides]``: compose configs/train.yaml and train.

Only Hydra, OmegaConf and ``train.config`` are imported here: ``--help``, ``--cfg job`` and a config
mistake answer in about a second; torch and diffusers load when training starts.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

from train.cache_settings import cache_adapter_choice
from train.config import CONFIG_DIR, ConfigError, check_sections, compose


def run_dir_follows_output_dir(argv: list[str]) -> list[str]:
    """``output_dir=RUN`` also moves Hydra's run dir there, so .hydra/ and train_rank0.log land in RUN."""
    given = [a.partition("=")[2] for a in argv if a.startswith("output_dir=")]
    if given and not any(a.startswith("hydra.run.dir=") for a in argv):
        return [*argv, f"hydra.run.dir={given[-1]}"]
    return argv


def quote_shards(argv: list[str]) -> list[str]:
    """Quote a bare ``data.shards=`` value that Hydra's override grammar cannot read: a brace pattern, non-ASCII.

    The shell has already removed the user's quotes; without these, Hydra answers with a lexer error
    instead of training or naming the missing shard. Sweeps (``-m``) keep their comma lists as they are.
    """
    if "-m" in argv or "--multirun" in argv:
        return argv
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        hard = "{" in value or "," in value or not value.isascii()
        if eq and key.lstrip("+~") == "data.shards" and hard and value[:1] not in "'\"[" and "'" not in value:
            arg = f"{key}='{value}'"
        out.append(arg)
    return out


def precheck(argv: list[str]) -> list[str]:
    """Compose the overrides first so a mistake is one line, before Hydra or torch get involved.

    Any flag (``--help``, ``--cfg job``, ``-m``, ``--info`` …) goes to Hydra untouched: those commands
    print or sweep, and a sweep's comma lists are not single values. Returns the overrides the data
    implies (a cache's adapter type), to be added as if typed.
    """
    if any(a.startswith("-") for a in argv):
        if any(a.startswith("output_dir=") for a in argv) and ("-m" in argv or "--multirun" in argv):
            raise ConfigError("output_dir= with -m would send every job to one folder; "
                              "set hydra.sweep.dir=DIR instead (job N trains in DIR/N)")
        return []
    cfg = compose(argv)
    check_sections(cfg)
    implied = cache_adapter_choice(argv, bool(cfg.data.cached), cfg.data.shards, str(cfg.adapter.type),
                                   cfg.data.get("cache_dir"))
    if implied:
        print(f"data=cached: the cache was made for {implied[0]}, so training uses it")
    given = [a.partition("=")[2] for a in argv if a.startswith("output_dir=")]
    if given:  # before Hydra writes .hydra/ and the log into it: a refused run must not touch another's folder
        from train.checks import check_output_dir
        from train.run_lock import check_run_dir_free

        check_output_dir(given[-1])
        check_run_dir_free(given[-1])
    return implied


def report_error(err: Exception | str) -> None:
    """The one ``error: ...`` line on stderr, or for launch.sh in its INSTANTSTYLE_ERROR_FILE (its last line)."""
    line = f"error: {err}"
    target = os.environ.get("INSTANTSTYLE_ERROR_FILE")
    if target:  # launch.sh prints it after the launcher exits, so the launcher's noise does not bury it
        with open(target, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    else:
        print(line, file=sys.stderr)


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

    try:
        implied = precheck(sys.argv[1:])
    except (ConfigError, CheckpointError) as err:
        report_error(err)
        sys.exit(2)
    sys.argv[1:] = run_dir_follows_output_dir(sys.argv[1:] + implied)
    main()
