"""Experiment trackers (the ``logger`` group) and the numbers the loop reports.

Trackers go through Accelerate (only the main process logs). Nothing from the environment
is ever written: the wandb key stays in ``wandb login``/``WANDB_API_KEY``.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse


log = logging.getLogger(__name__)


@dataclass
class Trackers:
    """What ``Accelerator(log_with=...)`` and ``init_trackers`` need."""

    log_with: list[str]
    project: str
    init_kwargs: dict = field(default_factory=dict)


def build_trackers(name: str, project: str = "instantstyle", mode: str = "offline", entity: str | None = None,
                   tags: list[str] | None = None, run_dir: str | Path = ".") -> Trackers:
    """Tracker settings for ``none``, ``tensorboard`` or ``wandb`` (online/offline/disabled)."""
    if name == "none":
        return Trackers([], project)
    if name == "tensorboard":
        return Trackers(["tensorboard"], project)
    if name == "wandb":
        if mode == "online" and not wandb_key_available():
            log.warning("logger.mode=online but no wandb API key (WANDB_API_KEY or `wandb login`): logging offline "
                        "instead; upload later with wandb sync %s/wandb", run_dir)
            mode = "offline"
        kwargs = {"mode": mode, "dir": str(run_dir), "tags": list(tags or [])}
        if entity:
            kwargs["entity"] = entity
        return Trackers(["wandb"], project, {"wandb": kwargs})
    raise ValueError(f"unknown logger {name!r} — valid: none, tensorboard, wandb")


def wandb_key_available() -> bool:
    """True when wandb can log in: WANDB_API_KEY, or a netrc entry for its host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    for path in filter(None, (os.environ.get("NETRC"), "~/.netrc", "~/_netrc")):
        try:
            if netrc.netrc(os.path.expanduser(path)).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            continue  # missing or unreadable: look at the next place
    return False


def loggable_config(record: Mapping) -> dict:
    """The run's settings (``Settings.record()``) as flat key -> value (what trackers show as hyperparameters)."""
    flat: dict = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if not str(k).startswith("_"):  # _target_ and friends are wiring, not hyperparameters
                    walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else json.dumps(node)

    walk(record, "")
    return flat


class ThroughputMeter:
    """Samples/s and the fraction of wall time spent waiting for data, over a logging window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start, self.wait, self.samples, self.losses = time.perf_counter(), 0.0, 0, []

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Time spent inside counts as data wait."""
        t0 = time.perf_counter()
        yield
        self.wait += time.perf_counter() - t0

    def add(self, samples: int, loss: float) -> None:
        self.samples += samples
        self.losses.append(loss)

    def read(self) -> dict[str, float]:
        """Window averages, then start a new window."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"samples_per_s": self.samples / elapsed, "data_wait_frac": self.wait / elapsed,
               "loss": sum(self.losses) / max(len(self.losses), 1)}
        self.reset()
        return out


HISTORY_NAME = "metrics.jsonl"  # RUN/metrics.jsonl: one line per log window, whatever the logger


def append_history(run_dir: Path, record: dict) -> None:
    """Append one log window; kept across resumes, so a preempted run keeps its whole curve."""
    with open(Path(run_dir) / HISTORY_NAME, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_history(run_dir: Path) -> list[dict]:
    """The run's log windows in step order; a line torn by a kill is skipped, a resumed step counts once."""
    path = Path(run_dir) / HISTORY_NAME
    by_step = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            by_step[record["step"]] = record  # a step logged again after a resume: the newer window wins
    return [by_step[step] for step in sorted(by_step)]


FILE_ONLY = "file_only"  # a log record's extra flag: for the run log, not the console (a progress bar shows it)


class _NotFileOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, FILE_ONLY, False)


def keep_window_lines_off_console() -> None:
    """Console handlers drop ``FILE_ONLY`` records, so the window lines go to train_rank0.log under a bar."""
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler and not any(isinstance(f, _NotFileOnly) for f in handler.filters):
            handler.addFilter(_NotFileOnly())


def format_duration(seconds: float) -> str:
    """'42s', '4m 13s', '2h 05m'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
