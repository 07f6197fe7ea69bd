"""Compare the points of a sweep, finished or not, and preview what a cluster launcher would submit.

    python -m train.sweep SWEEP_DIR [--best style_similarity] [--out sweep.md]   table + sweep.png
    python -m train.sweep plan hydra/launcher=slurm hydra.sweep.dir=DIR OVERRIDES...   the jobs, not submitted

One row per point: the overrides that differ between points, its status (finished, preempted,
running, stopped, pending), the training loss as the mean ± spread of its last log windows
(``RUN/metrics.jsonl``), samples/s, and evaluation means from a ``metrics.json`` that
``python -m instantstyle.evaluate`` wrote into the run folder, else from its newest validation.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import sys
from pathlib import Path

import yaml

from train.config import ConfigError
from train.loggers import read_history

METRICS = ("style_similarity", "text_alignment", "content_leakage")
LOWER_IS_BETTER = {"loss", "content_leakage"}
TAIL = 0.2  # the loss is summarised over the last fifth of the logged steps


def read_overrides(run: Path) -> list[str]:
    """The command-line overrides of one run (Hydra writes them for every job)."""
    path = run / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(path.read_text()) or []) if path.is_file() else []


def read_metrics(run: Path) -> tuple[dict[str, float], dict[str, float]]:
    """(means, baselines) of the first setting in the run's metrics.json, else its newest validation."""
    # An explicit evaluation in the run folder wins; training validation reports are RUN/eval/step-XXXXXXXX/.
    found = (sorted(run.glob("metrics.json")) + sorted(run.glob("*/metrics.json"))
             + sorted(run.glob("eval/step-*/metrics.json"), reverse=True))
    if not found:
        return {}, {}
    report = json.loads(found[0].read_text())
    setting = (report.get("settings") or [{}])[0]
    baselines = report.get("baselines") or setting.get("baselines") or {}
    means = {k: v for k, v in setting.get("mean", {}).items() if k in METRICS and v is not None}
    return means, {k: v for k, v in baselines.items() if k in METRICS and isinstance(v, (int, float))}


def loss_tail(history: list[dict]) -> tuple[float, float] | None:
    """Mean and standard deviation of the loss over the last fifth of the logged steps (at least one window)."""
    losses = [(r["step"], r["train/loss"]) for r in history if isinstance(r.get("train/loss"), (int, float))]
    if not losses:
        return None
    last = losses[-1][0]
    tail = [loss for step, loss in losses if step > last * (1 - TAIL)] or [losses[-1][1]]
    mean = sum(tail) / len(tail)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in tail) / len(tail))


def is_running(run: Path) -> bool:
    """True while a trainer holds the run's lock (on this file system)."""
    try:
        fd = os.open(run / ".lock", os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def status(run: Path, summary: dict) -> str:
    """finished | preempted | running | stopped (killed or failed: submit the sweep again) | pending."""
    if not run.is_dir():
        return "pending"
    if is_running(run):
        return "running"
    if summary and summary.get("step") == summary.get("max_steps") and not summary.get("preempted"):
        return "finished"
    if summary.get("preempted"):
        return "preempted"
    return "stopped"


def planned_points(sweep_dir: Path) -> dict[str, list[str]]:
    """Folder name -> overrides of every point Hydra's multirun.yaml says the sweep has."""
    from train.sweep_points import expand_points

    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return {}
    hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra", {})
    points = expand_points(hydra.get("overrides", {}).get("task", []), hydra.get("sweeper", {}).get("params"))
    return {str(i): point for i, point in enumerate(points)}


def collect(sweep_dir: str | Path) -> list[dict]:
    """One record per point (planned or found), in job order."""
    sweep_dir = Path(sweep_dir)
    planned = planned_points(sweep_dir)
    found = {p.name for p in sweep_dir.iterdir()
             if p.is_dir() and ((p / ".hydra").is_dir() or (p / "summary.json").is_file())}
    records = []
    for name in sorted(found | set(planned), key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n)):
        run = sweep_dir / name
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        metrics, baselines = read_metrics(run) if run.is_dir() else ({}, {})
        records.append({"run": name, "overrides": read_overrides(run) or planned.get(name, []),
                        "status": status(run, summary), "summary": summary, "loss": loss_tail(read_history(run)),
                        "metrics": metrics, "baselines": baselines})
    return records


def score(record: dict, metric: str) -> float | None:
    """The value a point is ranked by: a metric's mean, or the tail loss for ``loss``."""
    if metric == "loss":
        return record["loss"][0] if record["loss"] else None
    return record["metrics"].get(metric)


def best_run(records: list[dict], metric: str) -> str | None:
    """The finished point with the best ``metric`` (lowest for loss and leakage, else highest)."""
    scored = [(score(r, metric), r["run"]) for r in records if r["status"] == "finished" and score(r, metric) is not None]
    if not scored:
        return None
    pick = min if metric in LOWER_IS_BETTER else max
    return pick(scored)[1]


def default_metric(records: list[dict]) -> str:
    return "style_similarity" if any("style_similarity" in r["metrics"] for r in records) else "loss"


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _metric_cell(record: dict, metric: str) -> str:
    value, base = record["metrics"].get(metric), record["baselines"].get(metric)
    return _fmt(value, ".4f") + (f" (baseline {base:.4f})" if value is not None and base is not None else "")


def markdown_table(records: list[dict], best: str | None = None) -> str:
    """Markdown: overrides shared by every point are listed once above the table; the best point is marked."""
    best = best or default_metric(records)
    shared = set.intersection(*(set(r["overrides"]) for r in records)) if records else set()
    metric_cols = [m for m in METRICS if any(m in r["metrics"] for r in records)]
    winner = best_run(records, best)
    header = ["run", "overrides", "status", "steps", "loss (last 20%)", "samples/s", *metric_cols]
    lines = [f"Common overrides: {' '.join(sorted(shared)) or '(none)'}",
             f"Best by {best} ({'lower' if best in LOWER_IS_BETTER else 'higher'} is better): "
             f"{'run ' + winner if winner else 'no finished point yet'}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        s = r["summary"]
        own = " ".join(o for o in r["overrides"] if o not in shared) or "(defaults)"
        steps = f"{s['step']}/{s['max_steps']}" if s else "–"
        loss = f"{r['loss'][0]:.4f} ± {r['loss'][1]:.4f}" if r["loss"] else "–"
        cells = [f"**{r['run']}** ★" if r["run"] == winner else r["run"], own, r["status"], steps, loss,
                 _fmt(s.get("samples_per_s"), ".2f"), *(_metric_cell(r, m) for m in metric_cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(argv: list[str]) -> None:
    """``python -m train.sweep SWEEP_DIR``: the table on stdout, and the plot as a PNG."""
    parser = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun folder, e.g. multirun/2026-01-01_12-00-00")
    parser.add_argument("--best", default=None, choices=("loss", *METRICS),
                        help="metric that picks the best point (default: style_similarity when evaluated, else loss)")
    parser.add_argument("--out", help="also write the table to this file (default: only print it)")
    parser.add_argument("--plot", help="the plot's PNG (default: sweep.png beside --out, else in SWEEP_DIR)")
    args = parser.parse_args(argv)
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"{sweep_dir} is not a folder")
    records = collect(sweep_dir)
    if not records:
        raise ConfigError(f"no run folders in {sweep_dir} (expected Hydra multirun jobs 0/, 1/, …)")
    table = markdown_table(records, args.best)
    if args.out:
        Path(args.out).write_text(table)
    print(table, end="")
    from train.sweep_plot import plot_sweep

    png = Path(args.plot) if args.plot else (Path(args.out).parent if args.out else sweep_dir) / "sweep.png"
    if plot_sweep(records, args.best or default_metric(records), png):
        print(f"plot: {png}")


def plan(argv: list[str]) -> None:
    """``python -m train.sweep plan OVERRIDES``: each job a launcher would submit, nothing submitted."""
    from train.sweep_plan import describe_jobs

    print(describe_jobs(argv), end="")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        plan(argv[1:]) if argv[:1] == ["plan"] else report(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
