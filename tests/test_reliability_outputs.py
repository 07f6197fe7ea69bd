"""Nothing is written where it must not be: not over a device, not through a symlink, not under /proc,
not a half file on a full disk, and never weights that hold inf/NaN. The run lock follows no symlink and
frees its folder the moment its main process dies, even while orphaned data workers live on.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from instantstyle.errors import OutputPathError
from instantstyle.safe_paths import check_output_dir, check_output_file, write_atomic
from tests.helpers import tiny_overrides
from tests.test_reliability_library import assert_one_line, checkpoint, run_export  # noqa: F401 (a fixture)
from train.checkpoint import STATE_FILE, CheckpointError, CheckpointManager, encode_state
from train.run_lock import RunLock

REPO = Path(__file__).resolve().parents[1]


# --- one safe-output-path helper ------------------------------------------------------------------

@pytest.mark.parametrize("target", ["/dev/null", "/dev/full", "/proc/self/comm", "symlink", "fifo", "folder"])
def test_only_a_regular_file_or_a_new_name_is_replaced(tmp_path, target):
    if target == "symlink":
        (tmp_path / "victim").write_text("keep")
        os.symlink(tmp_path / "victim", tmp_path / "link")
        target = str(tmp_path / "link")
    elif target == "fifo":
        os.mkfifo(tmp_path / "pipe")
        target = str(tmp_path / "pipe")
    elif target == "folder":
        (tmp_path / "dir").mkdir()
        target = str(tmp_path / "dir")
    before = os.lstat(target)
    with pytest.raises(OutputPathError) as err:
        write_atomic(target, b"data")
    assert "\n" not in str(err.value)
    after = os.lstat(target)
    assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_ino == before.st_ino
    if Path(target).name == "link":
        assert (tmp_path / "victim").read_text() == "keep"


def test_a_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OutputPathError, match="No space left on device"):
        write_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


@pytest.mark.parametrize("where,needle", [("", "is empty"), ("/proc/x", "under /proc"), ("/sys/x", "under /sys")])
def test_output_folders_under_system_roots_or_empty_are_refused(where, needle):
    with pytest.raises(OutputPathError, match=needle):
        check_output_dir(where)


def test_output_files_under_dev_are_refused():
    with pytest.raises(OutputPathError, match="under /dev"):
        check_output_file("/dev/new-file")


# --- train.export ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["/dev/null", "/dev/full"])
def test_export_never_replaces_a_device(checkpoint, capsys, device):
    rc, err = run_export([str(checkpoint), "--out", device], capsys)
    assert_one_line(rc, err, device)
    assert stat.S_ISCHR(os.lstat(device).st_mode)


def test_export_of_a_nonfinite_checkpoint_is_refused(checkpoint, tmp_path, capsys):
    from train.checkpoint import read_state

    weights = read_state(checkpoint, "adapter")
    next(iter(weights.values())).view(-1)[0] = float("nan")
    tampered = {}  # written by hand: the checkpoint writer itself refuses NaN
    (checkpoint / "adapter.json").write_text(json.dumps(encode_state(weights, tampered)))
    save_file(tampered, str(checkpoint / "adapter.safetensors"))
    rc, err = run_export([str(checkpoint), "--out", str(tmp_path / "a.safetensors")], capsys)
    assert_one_line(rc, err, "NaN or inf")
    assert not (tmp_path / "a.safetensors").exists()


def test_export_ema_of_a_checkpoint_cut_short_says_why(checkpoint, tmp_path, capsys):
    state = json.loads((checkpoint / STATE_FILE).read_text())
    (checkpoint / STATE_FILE).write_text(json.dumps({**state, "states": ["adapter", "ema"], "pending": ["ema"]}))
    rc, err = run_export([str(checkpoint), "--out", str(tmp_path / "a.safetensors"), "--ema"], capsys)
    assert_one_line(rc, err, "stopped before its EMA weights were written")
    assert "ema was off" not in err


def _deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize("how", ["deep adapter.json", "deep trainer_state", "adapter.json a list",
                                 "missing tensor", "identity of numbers", "shadow not a dict"])
def test_export_of_hostile_checkpoint_json_is_one_line(checkpoint, tmp_path, capsys, how):
    args = [str(checkpoint), "--out", str(tmp_path / "a.safetensors")]
    state = json.loads((checkpoint / STATE_FILE).read_text())
    if how == "deep adapter.json":
        (checkpoint / "adapter.json").write_text(_deep(100000))
    elif how == "deep trainer_state":
        (checkpoint / STATE_FILE).write_text(_deep(100000))
    elif how == "adapter.json a list":
        (checkpoint / "adapter.json").write_text("[1, 2]")
    elif how == "missing tensor":
        (checkpoint / "adapter.json").write_text(json.dumps({"image_proj.proj.weight": {"__tensor__": "nope"}}))
    elif how == "identity of numbers":
        (checkpoint / STATE_FILE).write_text(json.dumps({**state, "identity": {k: 7 for k in state["identity"]}}))
    else:
        (checkpoint / "ema.json").write_text(json.dumps({"decay": 0.9, "shadow": [1]}))
        args.append("--ema")
    rc, err = run_export(args, capsys)
    assert_one_line(rc, err)
    assert not (tmp_path / "a.safetensors").exists()


# --- checkpoints ---------------------------------------------------------------------------------

def test_a_full_disk_at_checkpoint_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch):
    import train.checkpoint as checkpoint_module

    manager = CheckpointManager(tmp_path / "checkpoints", keep=3)
    module = torch.nn.Linear(2, 2)
    manager.save(1, {"adapter": module.state_dict()}, {"step": 1}, "")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    with pytest.raises(CheckpointError, match="cannot write checkpoint-00000002.*No space left") as err:
        manager.save(2, {"adapter": module.state_dict()}, {"step": 1}, "")
    assert "\n" not in str(err.value)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-00000001"]


# --- the run lock ---------------------------------------------------------------------------------

def test_the_lock_never_follows_a_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / ".lock")
    with pytest.raises(CheckpointError, match="symlink") as err:
        RunLock(run).acquire()
    assert "\n" not in str(err.value) and victim.read_text() == "precious\n"


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_lock_that_is_not_a_file_is_one_line(tmp_path, kind):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").mkdir() if kind == "folder" else os.mkfifo(run / ".lock")
    with pytest.raises(CheckpointError, match=r"\.lock") as err:
        RunLock(run).acquire()
    assert "\n" not in str(err.value)


def test_a_lock_outlives_no_killed_main_process_even_with_orphaned_workers(tmp_path):
    """kill -9 of the main process frees the folder at once, while a forked data worker still runs."""
    script = ("import os, sys, time; from train.run_lock import RunLock; lock = RunLock(sys.argv[1]); lock.acquire()\n"
              "child = os.fork()\n"
              "if child == 0:\n    time.sleep(60); os._exit(0)\n"
              "print(child, flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    try:
        with pytest.raises(CheckpointError, match=f"pid {proc.pid}"):
            RunLock(tmp_path).acquire()
        proc.kill()
        proc.wait()
        os.kill(worker, 0)  # the orphaned worker is still alive
        lock = RunLock(tmp_path)
        lock.acquire()
        lock.release()
    finally:
        proc.kill()
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_second_claim_from_the_same_process_is_refused_and_keeps_the_first(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(CheckpointError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
        # The first lock still holds against another process.
        probe = ("import sys; from train.run_lock import RunLock; RunLock(sys.argv[1]).acquire()")
        proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode != 0 and "in use" in proc.stderr
    finally:
        first.release()


def test_a_refused_second_run_leaves_the_first_runs_hydra_record(tiny_model_dir, shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = RunLock(out)
    holder.acquire()
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
        proc = subprocess.run([sys.executable, "-m", "train", *tiny_overrides(tiny_model_dir, shards, out)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
    finally:
        holder.release()
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: output_dir"), proc.stderr
    assert "Traceback" not in proc.stderr and sorted(p.name for p in out.iterdir()) == [".lock"]


# --- generate, evaluate, make_shards, synthetic -------------------------------------------------------

def test_generate_never_writes_through_a_symlink(tmp_path, capsys):
    from instantstyle.generate import main as generate_main

    victim = tmp_path / "victim.png"
    victim.write_bytes(b"keep")
    (tmp_path / "out.png").symlink_to(victim)
    style = tmp_path / "style.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(style)
    rc = generate_main(["--base", "unused", "--adapter", "unused.safetensors", "--style-image", str(style),
                        "--prompt", "a cat", "--out", str(tmp_path / "out.png")])
    assert_one_line(rc, capsys.readouterr().err, "symlink")
    assert victim.read_bytes() == b"keep"


@pytest.mark.parametrize("module", ["instantstyle.evaluate", "data_tools.synthetic", "data_tools.make_shards"])
def test_tools_refuse_an_output_folder_under_proc(module, tmp_path):
    args = {"instantstyle.evaluate": ["--base", "x", "--adapter", "x.safetensors", "--styles", str(tmp_path),
                                      "--prompts", "a", "--out", "/proc/report"],
            "data_tools.synthetic": ["--out", "/proc/shards", "--num", "2"],
            "data_tools.make_shards": ["--input", str(tmp_path), "--out", "/proc/shards"]}[module]
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and "under /proc" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_immutable_lock_is_one_line(tmp_path, monkeypatch):
    """chattr +i makes opening for writing fail with EPERM, even as root."""
    (tmp_path / ".lock").write_text("")
    real_open = os.open

    def immutable(path, flags, *args):
        if str(path).endswith(".lock") and flags & os.O_RDWR:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", immutable)
    with pytest.raises(CheckpointError, match="Operation not permitted") as err:
        RunLock(tmp_path).acquire()
    assert "\n" not in str(err.value)
