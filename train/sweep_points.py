"""The points of a Hydra sweep, as Hydra's basic sweeper numbers them, and how one point runs on a cluster.

A sweep's job N trains in ``SWEEP_DIR/N`` (``hydra.sweep.subdir``), so the list of points says which
folders a sweep will have before any job starts: ``train.sweep`` lists the pending ones and
``train.sweep plan`` prints what a launcher would submit. On SLURM every point is one job of
``nodes`` tasks (one per node); a point with more than one process runs ``launch.sh`` in each task,
which starts ``accelerate launch`` on the node's GPUs with the machine rank from SLURM.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from train.config import ConfigError

LAUNCH_SH = Path(__file__).resolve().parents[1] / "launch.sh"


def expand_points(overrides: list[str], sweeper_params: dict | None = None) -> list[list[str]]:
    """Every job's overrides, in job-number order (the basic sweeper's cartesian product)."""
    # The sweeper puts hydra.sweeper.params (from an experiment) before the command line's overrides.
    given = [f"{key}={value}" for key, value in (sweeper_params or {}).items()] + list(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(given)
    except Exception as err:  # Hydra's grammar errors are multi-line; the first line names the problem
        raise ConfigError(f"cannot read the sweep overrides: {str(err).splitlines()[0]}") from None
    (batch,) = BasicSweeper.split_arguments(parsed, None)
    return batch


def swept_keys(points: list[list[str]]) -> list[str]:
    """The keys whose value differs between points, in override order."""
    values: dict[str, set[str]] = {}
    for point in points:
        for item in point:
            key, _, value = item.partition("=")
            values.setdefault(key, set()).add(value)
    return [key for key, seen in values.items() if len(seen) > 1]


def point_processes(launcher: dict) -> tuple[int, int]:
    """(nodes, processes per node) of one point under a Hydra launcher's settings."""
    nodes = int(launcher.get("nodes") or 1)
    gpus = int(launcher.get("gpus_per_node") or 0)
    return nodes, max(gpus, 1)


def point_command(point: list[str], run_dir: str, processes_per_node: int) -> list[str]:
    """What each node of a point runs: launch.sh for several processes, else the trainer itself."""
    args = [*point, f"output_dir={run_dir}", "resume=auto"]
    if processes_per_node > 1:
        return [str(LAUNCH_SH), *args]
    return [sys.executable, "-m", "train", *args]


def runs_through_launch_sh(mode_is_multirun: bool, launcher: dict) -> bool:
    """A submitit job of a multi-process point hands over to launch.sh (never its own children)."""
    nodes, per_node = point_processes(launcher)
    return mode_is_multirun and "SUBMITIT_EXECUTOR" in os.environ and nodes * per_node > 1


def run_point_through_launch_sh(point: list[str], run_dir: str, launcher: dict) -> int:
    """Run this node's share of a multi-process sweep point; returns launch.sh's exit status."""
    if not LAUNCH_SH.is_file():
        raise ConfigError("a sweep point with several GPUs or nodes runs launch.sh, which is in the repository "
                          "checkout, not in the installed package: run the sweep from a checkout")
    _, per_node = point_processes(launcher)
    command = point_command(point, run_dir, per_node)
    env = {**os.environ, "NUM_GPUS": str(per_node), "RUN_NAME": Path(run_dir).name}
    print("sweep point runs: " + shlex.join(command), file=sys.stderr, flush=True)
    return subprocess.run(command, env=env, check=False).returncode


def hand_over_to_launch_sh(output_dir: str) -> int | None:
    """Inside a submitted multi-process sweep point: run launch.sh and return its status; else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    hydra = HydraConfig.get()
    launcher = OmegaConf.to_container(hydra.launcher, resolve=False)
    if not runs_through_launch_sh(hydra.mode == RunMode.MULTIRUN, launcher):
        return None
    return run_point_through_launch_sh(list(hydra.overrides.task), output_dir, launcher)
