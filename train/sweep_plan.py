"""``python -m train.sweep plan``: the jobs a sweep would submit, composed exactly as ``python -m train -m``
composes them, printed and not submitted."""

from __future__ import annotations

import shlex

from omegaconf import OmegaConf

from train.config import CONFIG_DIR, ConfigError
from train.sweep_points import expand_points, point_command, point_processes


def compose_hydra(overrides: list[str]):
    """The full config of one point including its ``hydra`` section (launcher, sweep dir)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name="train", overrides=overrides, return_hydra_config=True)
    except HydraException as err:
        raise ConfigError(str(err).splitlines()[0]) from None


def describe_jobs(argv: list[str]) -> str:
    """One line per point: folder, nodes × processes, and the command each node runs."""
    points = expand_points(argv)
    if not points:
        raise ConfigError("no overrides: give the sweep, e.g. optim.lr=1e-4,3e-4 blocks=style,style_layout")
    lines = []
    for num, point in enumerate(points):
        hydra = compose_hydra(point).hydra
        if num == 0:  # hydra's own overrides (launcher, sweep dir) are the same for every point
            params = OmegaConf.to_container(hydra.sweeper, resolve=True).get("params") or {}
            if params:
                points = expand_points(argv, params)
            launcher = OmegaConf.to_container(hydra.launcher, resolve=False)
            sweep_dir = str(hydra.sweep.dir)  # resolved as Hydra would now (the time, RUN_NAME)
            given = [o for o in argv if o.startswith("hydra.sweep.dir=")]
            lines += _header(launcher, sweep_dir, len(points), given[-1] if given else None)
    for num, point in enumerate(points):
        nodes, per_node = point_processes(launcher)
        own = [o for o in point if not o.startswith(("hydra.", "hydra/"))]
        run_dir = f"{sweep_dir}/{num}"
        lines.append(f"job {num}: {nodes} node(s) x {per_node} process(es) -> {run_dir}")
        lines.append("  each node runs: " + shlex.join(point_command(own, run_dir, per_node)))
    return "\n".join(lines) + "\n"


def _header(launcher: dict, sweep_dir: str, count: int, given_sweep_dir: str | None) -> list[str]:
    target = str(launcher.get("_target_", "")).rsplit(".", 1)[-1] or "BasicLauncher"
    keys = ("partition", "account", "timeout_min", "max_num_timeout", "cpus_per_task", "mem_gb")
    settings = " ".join(f"{k}={launcher[k]}" for k in keys if launcher.get(k) is not None)
    lines = [f"{count} job(s) through {target}" + (f" ({settings})" if settings else ""), f"sweep dir: {sweep_dir}"]
    if given_sweep_dir is None:
        lines.append("note: the sweep dir is named by the time; give hydra.sweep.dir=DIR so that submitting the sweep "
                     "again finds its finished points and skips them")
    return lines
