"""Summarise a Hydra multirun folder as one Markdown table.

    python -m train.sweep multirun/RUN_NAME [--out sweep.md]

One row per run folder: the overrides that differ between runs (from ``.hydra/overrides.yaml``),
its final loss and throughput (``summary.json``), and evaluation means from a ``metrics.json``
inside the run folder when ``python -m instantstyle.evaluate`` wrote one there, else from the
newest training validation report (``RUN/eval/step-XXXXXXXX/metrics.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

METRICS = ("style_similarity", "text_alignment", "content_leakage")


def read_overrides(run: Path) -> list[str]:
    """The command-line overrides of one run (Hydra writes them for every job)."""
    path = run / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(path.read_text()) or []) if path.is_file() else []


def read_metrics(run: Path) -> dict[str, float]:
    """Means of the first setting in the run's metrics.json, else its newest validation (empty when neither)."""
    # An explicit evaluation in the run folder wins; training validation reports are RUN/eval/step-XXXXXXXX/.
    found = (sorted(run.glob("metrics.json")) + sorted(run.glob("*/metrics.json"))
             + sorted(run.glob("eval/step-*/metrics.json"), reverse=True))
    if not found:
        return {}
    settings = json.loads(found[0].read_text()).get("settings") or [{}]
    return {k: v for k, v in settings[0].get("mean", {}).items() if k in METRICS and v is not None}


def collect(sweep_dir: str | Path) -> list[dict]:
    """One record per run folder (a folder with .hydra/ or summary.json), in job order."""
    runs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / "summary.json").is_file())]
    records = []
    for run in sorted(runs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name)):
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        records.append({"run": run.name, "overrides": read_overrides(run), "summary": summary,
                        "metrics": read_metrics(run)})
    return records


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(records: list[dict]) -> str:
    """Markdown: overrides shared by every run are listed once above the table, not in each row."""
    shared = set.intersection(*(set(r["overrides"]) for r in records)) if records else set()
    metric_cols = [m for m in METRICS if any(m in r["metrics"] for r in records)]
    header = ["run", "overrides", "steps", "final loss", "samples/s", *metric_cols]
    lines = [f"Common overrides: {' '.join(sorted(shared)) or '(none)'}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        s = r["summary"]
        own = " ".join(o for o in r["overrides"] if o not in shared) or "(defaults)"
        steps = "incomplete" if not s else f"{s['step']}/{s['max_steps']}" + (" (preempted)" if s.get("preempted") else "")
        cells = [r["run"], own, steps, _fmt(s.get("final_loss"), ".4f"), _fmt(s.get("samples_per_s"), ".2f"),
                 *(_fmt(r["metrics"].get(m), ".4f") for m in metric_cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a multirun folder, e.g. multirun/2026-01-01_12-00-00")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    if not Path(args.sweep_dir).is_dir():
        print(f"error: {args.sweep_dir} is not a folder", file=sys.stderr)
        sys.exit(2)
    records = collect(args.sweep_dir)
    if not records:
        print(f"error: no run folders in {args.sweep_dir} (expected Hydra multirun jobs 0/, 1/, …)", file=sys.stderr)
        sys.exit(2)
    table = markdown_table(records)
    if args.out:
        Path(args.out).write_text(table)
    print(table, end="")


if __name__ == "__main__":
    main()
