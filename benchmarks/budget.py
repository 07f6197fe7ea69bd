"""Time budgets and out-of-memory detection for benchmarks that must end on time and keep their rows."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# Expected seconds of each kind of work before one has been timed: a cold SDXL forward+backward compile
# takes 2-4 min, the meta-device FLOP count 15-30 s, an eager SDXL variant (build + 2 rows) about a minute.
FIRST_GUESS_S = {"cuda": {"flops": 30.0, "eager": 60.0, "compiled": 240.0},
                 "cpu": {"flops": 0.0, "eager": 0.0, "compiled": 240.0}}


class OutOfTime(Exception):
    """The time budget ran out in the middle of a piece of work."""


class Clock:
    """The run's time budget: whether the next piece of work fits, and a timer that stops one that overruns."""

    def __init__(self, budget_s: float, device: str = "cpu") -> None:
        self.budget_s, self.start, self.armed = budget_s, time.perf_counter(), False
        self.expected = dict(FIRST_GUESS_S["cuda" if device == "cuda" else "cpu"])

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, kind: str) -> bool:
        """Whether work of ``kind`` (flops, eager, compiled) is expected to end within the budget."""
        return self.elapsed() + self.expected[kind] <= self.budget_s

    @contextmanager
    def timing(self, kind: str) -> Iterator[None]:
        """Time one piece of work: its duration becomes the next one's expected cost."""
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.expected[kind] = time.perf_counter() - begin

    @contextmanager
    def stoppable(self) -> Iterator[None]:
        """Inside the block (and only there) the budget's end raises ``OutOfTime``; put it inside a ``try``."""
        self.armed = True
        try:
            yield
        finally:
            self.armed = False

    def _ring(self, _signum, _frame) -> None:
        if self.armed:  # between pieces of work, fits() already says no
            self.armed = False
            raise OutOfTime

    @contextmanager
    def deadline(self) -> Iterator[None]:
        """Inside the block, work still running when the budget is spent raises ``OutOfTime`` (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGALRM, self._ring)
        signal.setitimer(signal.ITIMER_REAL, max(self.budget_s - self.elapsed(), 1e-3))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", "cudaErrorMemoryAllocation")


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or a RuntimeError from cuBLAS/cuDNN/the CUDA runtime that failed to allocate."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m.lower() in str(error).lower() for m in OOM_MESSAGES)
