"""How many threads torch uses on CPU: one choice for every entry point (train, launch.sh, precompute, generate, evaluate).

PyTorch's default is one thread per core. Its OpenMP threads spin while they wait for each other, so on a
machine whose cores are busy with other jobs (or with this run's own data workers and ranks) they fight
for cores: beside two CPU-bound processes on 2 cores, a 64 px run trained at 4.8 samples/s with the
default and 28 with one thread. So the default here counts only the cores nobody else is using.
An explicit ``OMP_NUM_THREADS`` (or a thread count the caller passes) always wins.

    python -m instantstyle.threads [--processes N]   prints the choice for N processes (launch.sh uses it)
"""

from __future__ import annotations

import argparse
import os


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask, e.g. a SLURM or container limit)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def choose_threads(cpus: int, load: float, processes: int = 1) -> int:
    """Threads per process: the idle cores (``cpus`` minus the 1-minute ``load``) shared by ``processes``, at least 1."""
    idle = cpus - int(round(load))
    return max(1, min(idle, cpus) // max(1, processes))


def busy_cores() -> float:
    """Cores other processes keep busy: the 1-minute load, or the processes runnable right now when more.

    The load average lags about a minute behind jobs that just started; /proc/loadavg's running count
    (minus this process) sees them at once.
    """
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform: assume the machine is busy
        return float(available_cpus())
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            running = int(f.read().split()[3].split("/")[0]) - 1
    except (OSError, ValueError, IndexError):
        running = 0
    return max(load, float(running))


def default_threads(processes: int = 1) -> int:
    """``choose_threads`` for this machine now."""
    return choose_threads(available_cpus(), busy_cores(), processes)


def explicit_threads() -> int | None:
    """The user's ``OMP_NUM_THREADS`` when it is a whole number ≥ 1, else None."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) >= 1 else None


def configure_cpu_threads(processes: int = 1, threads: int | None = None, device: str | None = None) -> str:
    """Set torch's CPU thread count (``threads``, else OMP_NUM_THREADS, else the idle cores); returns a log line.

    ``processes`` = how many CPU-bound processes of this job share the machine (ranks, data workers).
    ``device`` None = CUDA when available; on a GPU nothing changes (the CPU only feeds it).
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cpu"):
        return f"device: {device}"
    if threads is not None:
        source = "as set"
    elif explicit_threads() is not None:
        threads, source = explicit_threads(), "OMP_NUM_THREADS"
    else:
        threads = default_threads(processes)
        source = f"idle cores of {available_cpus()}; OMP_NUM_THREADS=N to choose"
    torch.set_num_threads(threads)
    return f"device: cpu, {threads} torch thread{'s' if threads != 1 else ''} ({source})"


def main(argv: list[str] | None = None) -> int:
    """Print the default thread count per process (OMP_NUM_THREADS when set)."""
    parser = argparse.ArgumentParser(prog="python -m instantstyle.threads", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=1, help="CPU processes that share this machine")
    args = parser.parse_args(argv)
    print(explicit_threads() or default_threads(args.processes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
