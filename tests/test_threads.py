"""CPU thread count: one choice for every entry point, said in its first log line; an explicit setting wins."""

from __future__ import annotations

import pytest
import torch

from instantstyle.threads import choose_threads, configure_cpu_threads


@pytest.mark.parametrize("cpus, load, processes, threads", [
    (2, 2.9, 1, 1),    # two CPU-bound jobs beside us on 2 cores: PyTorch's default (2) ran 5-6x slower
    (2, 0.1, 1, 2),    # an idle machine: every core
    (16, 4.2, 1, 12),  # only the idle ones
    (16, 0.0, 4, 4),   # shared by this job's processes (ranks, data workers)
    (4, 9.0, 2, 1),    # never 0
])
def test_threads_are_the_idle_cores_shared_by_the_jobs_processes(cpus, load, processes, threads):
    assert choose_threads(cpus, load, processes) == threads


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_explicit_omp_num_threads_wins_and_the_line_says_so(monkeypatch, keep_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert configure_cpu_threads(processes=8, device="cpu") == "device: cpu, 3 torch threads (OMP_NUM_THREADS)"
    assert torch.get_num_threads() == 3
    assert configure_cpu_threads(threads=2, device="cpu").startswith("device: cpu, 2 torch threads")
    assert torch.get_num_threads() == 2


def test_without_a_setting_the_idle_cores_are_used(monkeypatch, keep_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.getloadavg", lambda: (50.0, 50.0, 50.0))  # a busy machine
    assert configure_cpu_threads(device="cpu").startswith("device: cpu, 1 torch thread (idle cores of")
    assert torch.get_num_threads() == 1
    assert configure_cpu_threads(device="cuda") == "device: cuda"  # a GPU run leaves the CPU alone
