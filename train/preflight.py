"""What a training command checks before Hydra, torch or any rank starts.

``python -m train`` runs ``quote_shards`` and ``precheck`` on its argv (a config mistake answers in
about a second). ``python -m train.preflight [overrides]`` runs every check a run makes before it
loads a model (``train.checks.check_config``: shards, base, blocks, cache, output folder) in one
process, and trains nothing: it exits 0 silently, or prints one ``error:`` line and exits 2.
launch.sh runs it once before starting its ranks, so a mistake is that one line rather than one per
rank under the launcher's failure report.
"""

from __future__ import annotations

import os
import sys
import time

from train.cache_settings import cache_adapter_choice
from train.config import ConfigError, check_sections, compose
from train.errors import CheckpointError


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


def precheck(argv: list[str], say: bool = True) -> list[str]:
    """Compose the overrides first so a mistake is one line, before Hydra or torch get involved.

    Any flag (``--help``, ``--cfg job``, ``-m``, ``--info`` …) goes to Hydra untouched: those commands
    print or sweep, and a sweep's comma lists are not single values. Returns the overrides the data
    implies (a cache's adapter type), to be added as if typed; ``say``: print that choice.
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
    if implied and say:
        print(f"data=cached: the cache was made for {implied[0]}, so training uses it")
    given = last_value(argv, "output_dir")
    if given is not None:  # before Hydra writes .hydra/ and the log into it: a refused run must not touch another's
        from train.checks import check_output_dir
        from train.run_lock import check_run_dir_free

        check_output_dir(given)
        check_run_dir_free(given)
    return implied


def preflight(argv: list[str]) -> None:
    """``precheck``, then ``check_config`` on the run's folder as Hydra will name it; raises the one-line error.

    Sweeps and other Hydra flags get ``precheck`` only: each point is checked when it starts.
    """
    argv = quote_shards(argv)
    implied = precheck(argv, say=False)
    if any(a.startswith("-") for a in argv):
        return
    from train.checks import check_config

    # Outside @hydra.main the run folder is not interpolated: name it as configs/train.yaml's hydra.run.dir does.
    output_dir = last_value(argv, "output_dir") or last_value(argv, "hydra.run.dir") or os.path.join(
        "outputs", os.environ.get("RUN_NAME") or time.strftime("%Y-%m-%d_%H-%M-%S"))
    overrides = [a for a in argv if not a.startswith(("hydra.", "output_dir="))]
    check_config(compose([*overrides, *implied, f"output_dir={output_dir}"]), load_metric_encoders=False)


def last_value(argv: list[str], key: str) -> str | None:
    """The value of the last ``key=`` override (Hydra applies the last), or None."""
    values = [a.partition("=")[2] for a in argv if a.startswith(f"{key}=")]
    return values[-1] if values else None


def report_error(err: Exception | str) -> None:
    """The one ``error: ...`` line on stderr, or for launch.sh in its INSTANTSTYLE_ERROR_FILE (its last line)."""
    line = f"error: {err}"
    target = os.environ.get("INSTANTSTYLE_ERROR_FILE")
    if target:  # launch.sh prints it after the launcher exits, so the launcher's noise does not bury it
        with open(target, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    else:
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from instantstyle.quiet import quiet_libraries

    quiet_libraries()
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    try:
        preflight(argv)
    except (ConfigError, CheckpointError) as err:
        report_error(err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
