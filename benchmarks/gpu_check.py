"""The first eight minutes on a GPU: does this machine train, resume, export and how fast does it step?

    python -m benchmarks.gpu_check [--out DIR]      # on one GPU; every step has a budget, the sum is under 8 min
    python -m benchmarks.gpu_check --smoke          # the same steps on CPU with the tiny models (the tests run it)

Steps, in order: the environment and which attention kernels run; synthetic shards; the eager
rows of ``benchmarks.bench_gpu`` (full-size SDXL, random weights); a toy training with
``mixed_precision=auto`` to step 10 with a checkpoint; its resume to step 20 with
``trainer.compile=true``; an fp16 export of the last checkpoint; 8-bit AdamW with gradient
checkpointing and EMA to step 5, resumed to step 10. Every command runs in its own process,
killed at its step's budget; each result is a line on stdout and in ``DIR/gpu_check.jsonl`` as soon
as it exists (bench rows one by one), each command's output in ``DIR/logs/``; a summary ends it.
Exit status 0 when nothing failed or ran out of time (skipped steps say why), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import gpu_check_env

REPO = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 480.0  # the promise: one GPU, eight minutes


@dataclass
class Result:
    """What a step found: ok, failed, timeout or skipped, a one-line detail and its numbers."""

    status: str
    detail: str = ""
    data: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Step:
    """A named piece of the check with its time budget and the steps whose success it needs."""

    name: str
    budget_s: float
    run: Callable[[Check, float], Result]
    needs: tuple[str, ...] = ()


class Check:
    """Where results go (stdout and the JSON lines file, flushed at once) and how commands run."""

    def __init__(self, out: Path, smoke: bool) -> None:
        self.out, self.smoke, self.results = out, smoke, {}
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "gpu_check.jsonl", "a", buffering=1)  # line-buffered: a kill keeps every line

    def write(self, record: dict, line: str) -> None:
        """One result: a JSON line in the file and a readable line on stdout, both flushed now."""
        self.jsonl.write(json.dumps(record) + "\n")
        print(line, flush=True)

    def command(self, name: str, args: list[str], budget_s: float, env: dict | None = None,
                on_line: Callable[[str], None] | None = None) -> tuple[int | None, list[str]]:
        """Run ``python ARGS`` in its own process group, killed at ``budget_s``; (exit code or None, output lines)."""
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environment.get("PYTHONPATH")]))
        log = open(self.out / "logs" / f"{name}.log", "a", buffering=1)
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=environment, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        lines: list[str] = []
        reader = threading.Thread(target=follow, args=(proc, lines, log, on_line), daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: data workers and compiler processes too
            proc.wait()
            code = None
        reader.join(timeout=5)
        log.close()
        return code, lines


def follow(proc: subprocess.Popen, lines: list[str], log, on_line: Callable[[str], None] | None) -> None:
    """Copy a command's output to its log as it comes, keep the lines, and hand each to ``on_line``."""
    for raw in proc.stdout:
        line = raw.rstrip("\n")
        lines.append(line)
        log.write(raw)
        if on_line is not None:
            on_line(line)


def tail(lines: list[str]) -> str:
    """The last non-empty line of a command's output: usually its error."""
    return next((line.strip() for line in reversed(lines) if line.strip()), "no output")


def finished(code: int | None, lines: list[str], budget_s: float) -> Result | None:
    """A failed or timed-out command's result, or None when it exited 0."""
    if code is None:
        return Result("timeout", f"killed at its budget of {budget_s:.0f} s; last line: {tail(lines)}")
    if code != 0:
        return Result("failed", f"exit {code}: {tail(lines)}")
    return None


# ---- the steps ------------------------------------------------------------------------------------------------

def check_environment(check: Check, budget_s: float) -> Result:
    """Versions, the device, and which scaled-dot-product attention kernels run on it."""
    report = gpu_check_env.environment_report(check.smoke)
    kernels = ", ".join(k for k, v in report["attention_kernels"].items() if v == "ok") or "none"
    return Result("ok", f"{report['device']}; torch {report['torch']}; attention kernels that run: {kernels}", report)


def make_shards(check: Check, budget_s: float) -> Result:
    """Synthetic 64 px shards for the toy runs."""
    from data_tools.synthetic import write_synthetic_shards

    manifest = write_synthetic_shards(check.out / "shards", num=32 if check.smoke else 128, size=64, per_shard=16)
    return Result("ok", f"{manifest.num_samples} samples in {len(manifest.shards)} shards",
                  {"shards": str(check.out / "shards")})


def bench_rows(check: Check, budget_s: float) -> Result:
    """The eager rows of bench_gpu, each recorded as it is printed."""
    from benchmarks.bench_gpu import VARIANTS

    rows: list[list[str]] = []

    def on_line(line: str) -> None:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] in VARIANTS:
            rows.append(cells)
            check.write({"step": "bench", "row": cells}, f"      bench row: {line}")

    smoke = ["--dry-run", "--variants", "style"] if check.smoke else []
    args = ["-m", "benchmarks.bench_gpu", "--no-compile", "--time-budget", f"{budget_s - 25:.0f}", *smoke]
    code, lines = check.command("bench", args, budget_s, on_line=on_line)
    failed = finished(code, lines, budget_s)
    if failed is not None:
        failed.data["rows"] = rows
        return failed
    ooms = sum("OOM" in cells[3] for cells in rows)
    return Result("ok", f"{len(rows)} rows ({ooms} out of memory); table in logs/bench.log", {"rows": rows})


def train_args(check: Check, out: str, *extra: str) -> list[str]:
    """``python -m train`` on the toy base and the check's shards, mixed_precision=auto."""
    workers = 0 if check.smoke else 2
    return ["-m", "train", "model=toy", f"data.shards={check.out / 'shards'}/*.tar", f"data.num_workers={workers}",
            "data.shuffle_buffer=16", "trainer.batch_size=4", "trainer.mixed_precision=auto", "trainer.log_every=5",
            "logger=none", f"output_dir={check.out / out}", *extra]


def run_training(check: Check, name: str, budget_s: float, out: str, steps: int, *extra: str,
                 env: dict | None = None) -> Result:
    """Train (or resume) to ``steps`` and read back its summary."""
    code, lines = check.command(name, train_args(check, out, f"trainer.max_steps={steps}", *extra), budget_s, env)
    failed = finished(code, lines, budget_s)
    if failed is not None:
        return failed
    summary = json.loads((check.out / out / "summary.json").read_text())
    loss = summary.get("final_loss")
    if summary.get("step") != steps or loss is None or not math.isfinite(loss):
        return Result("failed", f"summary says step {summary.get('step')}, loss {loss}", summary)
    resumed = Path(summary.get("resumed_from", "")).name or "fresh"
    return Result("ok", f"step {steps}, loss {loss:.4f}, {summary['samples_per_s']:.1f} samples/s, from {resumed}",
                  summary)


def train_toy(check: Check, budget_s: float) -> Result:
    """Ten steps on the toy base with mixed_precision=auto, checkpoint at step 10."""
    return run_training(check, "train", budget_s, "run", 10, "trainer.checkpoint_every=10")


def resume_compiled(check: Check, budget_s: float) -> Result:
    """The run resumed from step 10 to 20 with trainer.compile=true; it exports at the end."""
    # The smoke keeps the trainer.compile=true path but not inductor's minutes on a CPU: torch.compile is a no-op.
    env = {"TORCH_COMPILE_DISABLE": "1"} if check.smoke else None
    result = run_training(check, "resume_compile", budget_s, "run", 20, "trainer.checkpoint_every=10",
                          "trainer.compile=true", "resume=auto", env=env)
    return expect_resumed(result, "checkpoint-00000010", "; compile disabled in the smoke" if check.smoke else "")


def expect_resumed(result: Result, folder: str, note: str = "") -> Result:
    """``result`` failed unless its run resumed from ``folder``."""
    if result.status == "ok" and Path(result.data.get("resumed_from", "")).name != folder:
        return Result("failed", f"did not resume from {folder}: {result.detail}", result.data)
    result.detail += note
    return result


def export_fp16(check: Check, budget_s: float) -> Result:
    """``python -m train.export`` of the step-20 checkpoint in fp16, read back."""
    from safetensors import safe_open

    out = check.out / "ip-adapter-fp16.safetensors"
    ckpt = check.out / "run" / "checkpoints" / "checkpoint-00000020"
    code, lines = check.command("export", ["-m", "train.export", str(ckpt), "--out", str(out), "--dtype", "fp16"],
                                budget_s)
    failed = finished(code, lines, budget_s)
    if failed is not None:
        return failed
    with safe_open(str(out), "pt") as f:
        keys, step = list(f.keys()), (f.metadata() or {}).get("step")
        dtypes = {str(f.get_tensor(k).dtype) for k in keys}
    if step != "20" or dtypes != {"torch.float16"}:
        return Result("failed", f"export holds step {step}, dtypes {sorted(dtypes)}")
    return Result("ok", f"{len(keys)} tensors in fp16, step {step}: {out.name}", {"path": str(out)})


EIGHT_BIT = ("optim=adamw8bit", "trainer.gradient_checkpointing=true", "trainer.ema=0.99", "trainer.checkpoint_every=5")


def eight_bit_missing(check: Check) -> str:
    """Why the 8-bit AdamW steps cannot run here, or ''."""
    import importlib.util

    if check.smoke or not gpu_check_env.cuda_available():
        return "8-bit AdamW (bitsandbytes) needs a CUDA GPU"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed: pip install -e '.[8bit]'"
    return ""


def train_8bit(check: Check, budget_s: float) -> Result:
    """8-bit AdamW, gradient checkpointing and EMA to step 5."""
    why = eight_bit_missing(check)
    return Result("skipped", why) if why else run_training(check, "adamw8bit", budget_s, "run8bit", 5, *EIGHT_BIT)


def resume_8bit(check: Check, budget_s: float) -> Result:
    """That run resumed from step 5 to 10."""
    why = eight_bit_missing(check)
    if why:
        return Result("skipped", why)
    result = run_training(check, "adamw8bit_resume", budget_s, "run8bit", 10, *EIGHT_BIT, "resume=auto")
    return expect_resumed(result, "checkpoint-00000005")


# Budgets in seconds; their sum stays under TOTAL_BUDGET_S with room for this process's own start.
STEPS = (
    Step("environment", 15, check_environment),
    Step("shards", 10, make_shards),
    Step("bench", 150, bench_rows),
    Step("train", 60, train_toy, needs=("shards",)),
    Step("resume_compile", 120, resume_compiled, needs=("train",)),
    Step("export", 25, export_fp16, needs=("resume_compile",)),
    Step("adamw8bit", 40, train_8bit, needs=("shards",)),
    Step("adamw8bit_resume", 40, resume_8bit, needs=("adamw8bit",)),
)


def run_step(check: Check, step: Step) -> Result:
    """One step within its budget: skipped when a step it needs did not succeed; any error is its result."""
    missing = [n for n in step.needs if check.results.get(n, Result("skipped")).status != "ok"]
    start = time.perf_counter()
    if missing:
        result = Result("skipped", f"needs {', '.join(missing)}")
    else:
        try:
            result = step.run(check, step.budget_s)
        except Exception as error:  # noqa: BLE001 -- one broken step must not hide the others' results
            result = Result("failed", f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    seconds = time.perf_counter() - start
    if result.status == "ok" and seconds > step.budget_s:  # an in-process step cannot be killed: say it overran
        result = Result("timeout", f"took {seconds:.0f} s of its {step.budget_s:.0f} s: {result.detail}", result.data)
    check.results[step.name] = result
    check.write({"step": step.name, "status": result.status, "seconds": round(seconds, 1),
                 "budget_s": step.budget_s, "detail": result.detail, "data": result.data},
                f"[{result.status}] {step.name} ({seconds:.0f} s of {step.budget_s:.0f} s): {result.detail}")
    return result


def summarize(check: Check, total_s: float) -> int:
    """The closing table; exit status 1 when a step failed or ran out of time."""
    bad = [n for n, r in check.results.items() if r.status in ("failed", "timeout")]
    print(f"\nsummary ({total_s:.0f} s of {TOTAL_BUDGET_S:.0f} s; results in {check.out / 'gpu_check.jsonl'}):")
    for name, result in check.results.items():
        print(f"  {result.status:8s} {name}")
    verdict = f"FAILED: {', '.join(bad)}" if bad else "all steps ok or skipped"
    check.write({"step": "summary", "seconds": round(total_s, 1), "bad": bad,
                 "statuses": {n: r.status for n, r in check.results.items()}}, verdict)
    return 1 if bad else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check"), help="new or empty folder for the results")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models: checks the check itself")
    args = parser.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"--out {args.out} is not an empty folder: choose a new one")
    if not args.smoke and not gpu_check_env.cuda_available():
        parser.error("no CUDA device: run on a GPU, or pass --smoke to check the steps on CPU")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check = Check(args.out.resolve(), args.smoke)
    start = time.perf_counter()
    print(f"gpu_check{' --smoke' if args.smoke else ''}: {len(STEPS)} steps, budgets {sum(s.budget_s for s in STEPS):.0f} s "
          f"in all; results in {check.out}", flush=True)
    for step in STEPS:
        run_step(check, step)
    return summarize(check, time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
