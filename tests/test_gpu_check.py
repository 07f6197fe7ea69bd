"""The GPU check (benchmarks/gpu_check.py): its CPU smoke run end to end, budgets, kills and failures."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import STEPS, TOTAL_BUDGET_S, Check, Result, Step


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One --smoke run: (exit status, stdout, the JSON lines)."""
    out = tmp_path_factory.mktemp("check") / "gpu-check"
    capture = pytest.MonkeyPatch()
    lines = []
    capture.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    try:
        code = gpu_check.main(["--smoke", "--out", str(out)])
    finally:
        capture.undo()
    records = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    return code, lines, records, out


def test_smoke_run_trains_resumes_with_compile_exports_and_skips_8bit_on_cpu(smoke):
    code, lines, records, out = smoke
    assert code == 0
    status = {r["step"]: r for r in records if "status" in r}
    assert {n: status[n]["status"] for n in status} == {
        "environment": "ok", "shards": "ok", "bench": "ok", "train": "ok", "resume_compile": "ok", "export": "ok",
        "adamw8bit": "skipped", "adamw8bit_resume": "skipped"}
    assert status["environment"]["data"]["attention_kernels"]["math"] == "ok"
    assert status["train"]["data"]["step"] == 10 and "resumed_from" not in status["train"]["data"]
    assert status["resume_compile"]["data"]["resumed_from"].endswith("checkpoint-00000010")
    assert status["resume_compile"]["data"]["step"] == 20 and (out / "run" / "ip-adapter.safetensors").is_file()
    assert "needs a CUDA GPU" in status["adamw8bit"]["detail"]
    assert status["adamw8bit_resume"]["detail"] == "needs adamw8bit"
    assert all(r["seconds"] <= r["budget_s"] for r in status.values())


def test_smoke_results_are_written_as_they_come_and_summarized_at_the_end(smoke):
    code, lines, records, out = smoke
    order = [r["step"] for r in records]
    rows = [r for r in records if "row" in r]
    # bench rows are recorded one by one, before the bench step's own result line
    bench_result = next(i for i, r in enumerate(records) if r["step"] == "bench" and "status" in r)
    assert rows and bench_result > max(i for i, r in enumerate(records) if "row" in r)
    assert rows[0]["row"][:3] == ["style", "live", "no"] and float(rows[0]["row"][3]) > 0
    assert order[-1] == "summary" and records[-1]["bad"] == []
    assert lines[-1] == "all steps ok or skipped" and any(line.startswith("[ok] export") for line in lines)
    assert (out / "logs" / "train.log").read_text().strip()
    noise = ("Failed to load", "register_constant", "requires torchvision", "Unable to import")
    assert not [line for log in (out / "logs").glob("*.log") for line in log.read_text().splitlines()
                if any(n in line for n in noise)]


def test_step_budgets_fit_eight_minutes_on_one_gpu():
    assert sum(step.budget_s for step in STEPS) <= TOTAL_BUDGET_S - 15  # room for the check's own start


def test_a_command_past_its_budget_is_killed_with_its_whole_process_group(tmp_path):
    check = Check(tmp_path, smoke=True)
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);" \
             "print('started', flush=True); time.sleep(60)"
    start = time.perf_counter()
    code, lines = check.command("sleeper", ["-c", script], budget_s=3)
    assert code is None and lines == ["started"] and time.perf_counter() - start < 15
    result = gpu_check.finished(code, lines, 3)
    assert result.status == "timeout" and "started" in result.detail


def test_a_failing_step_is_a_result_and_the_steps_after_it_still_run(monkeypatch, tmp_path, capsys):
    def broken(check, budget_s):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setattr(gpu_check, "STEPS", (Step("first", 5, broken), Step("second", 5, lambda c, b: Result("ok")),
                                             Step("third", 5, lambda c, b: Result("ok"), needs=("first",))))
    assert gpu_check.main(["--smoke", "--out", str(tmp_path / "c")]) == 1
    out = capsys.readouterr().out
    assert "[failed] first" in out and "RuntimeError: CUDA error: an illegal memory access" in out
    assert "[ok] second" in out and "[skipped] third" in out and "needs first" in out
    assert out.strip().splitlines()[-1] == "FAILED: first"


def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "gpu_check.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--smoke", "--out", str(tmp_path / "old")])
    assert exit_info.value.code == 2 and "not an empty folder" in capsys.readouterr().err.strip().splitlines()[-1]
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.main(["--out", str(tmp_path / "new")])
        assert exit_info.value.code == 2 and "--smoke" in capsys.readouterr().err.strip().splitlines()[-1]
