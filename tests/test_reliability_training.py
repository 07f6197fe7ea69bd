"""Nothing a user or a disk throws at training crashes a run or loses work.

Shards that are not tars, metadata out of range, corrupt checkpoints, ranks that see different
checkpoints, two runs in one folder, non-finite losses, the documented shell patterns, unusable
paths, a missing wandb key and re-running a finished run: each is skipped, recovered from, or
stopped with one line.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_tools.decode import BadSample, decode_meta
from data_tools.shards import Sample, TruncatedTar, expand_shards, iter_samples, tar_bytes
from tests.helpers import tiny_overrides
from tests.test_data_loader import data_cfg, good_sample, keys_of, make_dataset, png_bytes, take
from train.checkpoint import CheckpointError, CheckpointManager
from train.config import ConfigError, compose
from train.data import build_train_loader
from train.training import train

REPO = Path(__file__).resolve().parents[1]


# --- shards that are not tars, metadata out of range -------------------------------------------

def _bad_size_tar() -> bytes:
    """A tar whose first header has a valid checksum but a size field that is not octal."""
    data = bytearray(tar_bytes([good_sample(0)]))
    data[124:136] = b"9z9z9z9z9z9\0"
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\0 " % sum(data[:512])
    return bytes(data)


def not_tars() -> dict[str, bytes]:
    """Files a user may point data.shards at by mistake, by name."""
    rng = torch.Generator().manual_seed(0)
    return {"random": bytes(torch.randint(0, 256, (5000,), generator=rng, dtype=torch.uint8).tolist()),
            "text": b"this is a caption file, not a shard\n" * 40, "png": png_bytes(1, (64, 64)),
            "gzip": gzip.compress(tar_bytes([good_sample(0), good_sample(1)]), mtime=0),
            "bad size": _bad_size_tar()}


@pytest.mark.parametrize("kind", sorted(not_tars()))
def test_a_file_that_is_not_a_tar_is_reported_not_raised(tmp_path, kind):
    path = tmp_path / "x.tar"
    path.write_bytes(not_tars()[kind])
    with open(path, "rb") as stream, pytest.raises(TruncatedTar) as err:
        list(iter_samples(stream, str(path)))
    assert err.value.reason == "not a tar" and "\n" not in str(err.value)


def test_loader_skips_and_counts_shards_that_are_not_tars(tmp_path):
    good = set(make_dataset(tmp_path, 1, 4))
    for i, data in enumerate(not_tars().values(), start=1):
        (tmp_path / f"{i:05d}.tar").write_bytes(data)
    loader = build_train_loader(data_cfg(tmp_path, shuffle_buffer=0), batch_size=1, seed=0, rank=0, world_size=1)
    keys = keys_of(take(loader, 2 * len(good)))  # two epochs
    assert Counter(keys) == Counter({k: 2 for k in good})
    # One count per bad shard and epoch; the reason names the shard as broken.
    assert sum(n for reason, n in loader.skipped().items() if "tar" in reason) >= len(not_tars())


@pytest.mark.parametrize("meta", [{"original_height": 10**23, "original_width": 512},
                                  {"original_height": 512, "original_width": -4},
                                  {"original_height": 512, "original_width": 2**20 + 1},
                                  {"original_height": "512", "original_width": 512},
                                  {"original_height": True, "original_width": 512},
                                  {"original_height": 51.2, "original_width": 512}])
def test_conditioning_metadata_out_of_range_is_a_bad_sample(meta):
    with pytest.raises(BadSample) as err:
        decode_meta({"json": json.dumps(meta).encode()})
    assert err.value.reason == "bad metadata"
    assert decode_meta({"json": b'{"original_height": 1048576, "original_width": 7, "caption": "x"}'})


def test_loader_skips_a_sample_whose_size_overflows_collate(tmp_path):
    good = [good_sample(i) for i in range(4)]
    huge = Sample("huge", {**good_sample(9).members, "json": b'{"original_height": 100000000000000000000000}'})
    (tmp_path / "00000.tar").write_bytes(tar_bytes([*good, huge]))
    loader = build_train_loader(data_cfg(tmp_path), batch_size=2, seed=0, rank=0, world_size=1)
    keys = keys_of(take(loader, 4))
    assert "huge" not in keys and set(keys) == {s.key for s in good}
    assert loader.skipped()["bad metadata"] >= 1


# --- checkpoints: corrupt ones are skipped under auto, refused as PATH ---------------------------

STEPS = ("trainer.checkpoint_every=1", "trainer.checkpoints_to_keep=3", "optim.lr=1e-3")


@pytest.fixture(scope="module")
def three_checkpoints(tiny_model_dir, shards, tmp_path_factory) -> Path:
    """A finished 3-step run with checkpoints at steps 1, 2, 3."""
    out = tmp_path_factory.mktemp("three")
    train(compose(tiny_overrides(tiny_model_dir, shards, out, "trainer.max_steps=3", *STEPS)))
    return out


def _corrupt(folder: Path, how: str) -> None:
    if how == "truncated adapter":
        data = (folder / "adapter.safetensors").read_bytes()
        (folder / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "broken trainer_state":
        (folder / "trainer_state.json").write_text('{"step": 3, "ident')
    elif how == "missing ranks":
        (folder / "ranks.json").unlink()
    elif how == "zero-byte optimizer":
        (folder / "optimizer.safetensors").write_bytes(b"")


CORRUPTIONS = ("truncated adapter", "broken trainer_state", "missing ranks", "zero-byte optimizer")


def test_resume_auto_falls_back_past_corrupt_newest_checkpoints(three_checkpoints, tiny_model_dir, shards,
                                                                  tmp_path, caplog):
    for how in CORRUPTIONS:
        out = tmp_path / how.replace(" ", "_")
        shutil.copytree(three_checkpoints / "checkpoints", out / "checkpoints")
        _corrupt(out / "checkpoints" / "checkpoint-00000003", how)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="train"):
            run = train(compose(tiny_overrides(tiny_model_dir, shards, out, "trainer.max_steps=4", *STEPS)))
        assert run.summary["resumed_from"].endswith("checkpoint-00000002") and run.step == 4, how
        lines = [r.getMessage() for r in caplog.records if "checkpoint-00000003" in r.getMessage()]
        assert len(lines) == 1 and "unusable" in lines[0] and "\n" not in lines[0], (how, lines)
        # The corrupt step-3 folder was replaced by a good one when training passed step 3 again.
        assert load_file(str(out / "checkpoints/checkpoint-00000003/adapter.safetensors"))


def test_resume_path_to_a_corrupt_checkpoint_is_one_line(three_checkpoints, tiny_model_dir, shards, tmp_path):
    for how in CORRUPTIONS:
        folder = tmp_path / how.replace(" ", "_")
        shutil.copytree(three_checkpoints / "checkpoints" / "checkpoint-00000003", folder)
        _corrupt(folder, how)
        cfg = compose(tiny_overrides(tiny_model_dir, shards, tmp_path / "run", f"resume={folder}"))
        with pytest.raises(CheckpointError) as err:
            train(cfg)
        assert folder.name in str(err.value) and "\n" not in str(err.value), how


def test_resume_auto_with_only_corrupt_checkpoints_stops_instead_of_starting_over(three_checkpoints, tiny_model_dir,
                                                                                    shards, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints / "checkpoints", out / "checkpoints")
    for folder in (out / "checkpoints").iterdir():
        _corrupt(folder, "zero-byte optimizer")
    with pytest.raises(CheckpointError, match="no usable checkpoint") as err:
        train(compose(tiny_overrides(tiny_model_dir, shards, out, "trainer.max_steps=4", *STEPS)))
    assert "resume=none" in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "checkpoint-00000003"  # nothing deleted


# --- ranks agree on the checkpoint --------------------------------------------------------------

class FakeAccelerator:
    """The little of Accelerator that choosing a checkpoint uses, for one of two simulated ranks."""

    def __init__(self, rank: int) -> None:
        self.process_index, self.num_processes, self.is_main_process = rank, 2, rank == 0


def run_two_ranks(monkeypatch, roots: list[Path], resume: str = "auto") -> list:
    """Choose the checkpoint on two threads acting as ranks, each with its own output_dir listing."""
    import train.training as training

    barrier, board = threading.Barrier(2, timeout=30), {}

    def gather_json(obj, accelerator):
        board[accelerator.process_index] = obj
        barrier.wait()
        out = [board[0], board[1]]
        barrier.wait()
        return out

    monkeypatch.setattr(training, "gather_json", gather_json)
    results: list = [None, None]

    def rank(r: int) -> None:
        manager = CheckpointManager(roots[r] / "checkpoints", keep=3)
        try:
            results[r] = training.checkpoint_to_resume(resume, manager, FakeAccelerator(r))
        except CheckpointError as err:
            results[r] = err

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    return results


def test_ranks_resume_rank0s_choice_or_fail_together(three_checkpoints, tmp_path, monkeypatch):
    roots = [tmp_path / "node0", tmp_path / "node1"]
    shutil.copytree(three_checkpoints / "checkpoints", roots[0] / "checkpoints")
    shutil.copytree(three_checkpoints / "checkpoints", roots[1] / "checkpoints")
    _corrupt(roots[0] / "checkpoints" / "checkpoint-00000003", "truncated adapter")
    shutil.rmtree(roots[1] / "checkpoints" / "checkpoint-00000001")
    # Rank 0 decides (its step 3 is corrupt, so step 2); rank 1 follows although its own newest is step 3.
    chosen = run_two_ranks(monkeypatch, roots)
    assert [(c.folder.name, c.step) for c in chosen] == [("checkpoint-00000002", 2)] * 2
    assert [c.folder.parent for c in chosen] == [roots[0] / "checkpoints", roots[1] / "checkpoints"]
    # A rank that cannot see the chosen checkpoint: both ranks stop with the same one line.
    shutil.rmtree(roots[1] / "checkpoints" / "checkpoint-00000002")
    errors = run_two_ranks(monkeypatch, roots)
    assert all(isinstance(e, CheckpointError) for e in errors) and str(errors[0]) == str(errors[1])
    assert "rank 1" in str(errors[0]) and "checkpoint-00000002" in str(errors[0]) and "\n" not in str(errors[0])
    # A rank 0 error (nothing usable) reaches every rank instead of leaving rank 1 waiting.
    errors = run_two_ranks(monkeypatch, [tmp_path / "nothing", roots[1]], resume=str(tmp_path / "nothing"))
    assert all(isinstance(e, CheckpointError) for e in errors) and str(errors[0]) == str(errors[1])


@pytest.mark.skipif(os.environ.get("SKIP_MULTIPROCESS") == "1", reason="SKIP_MULTIPROCESS=1")
def test_two_processes_with_node_local_output_dirs_fail_clearly(three_checkpoints, tiny_model_dir, shards, tmp_path):
    from tests.test_launch import free_port

    shutil.copytree(three_checkpoints / "checkpoints", tmp_path / "node0" / "checkpoints")
    # Each rank gets its own output_dir (as a node-local disk would): rank 1 sees no checkpoint.
    overrides = tiny_overrides(tiny_model_dir, shards, str(tmp_path / "node${oc.env:RANK}"), "trainer.max_steps=4",
                               f"hydra.run.dir={tmp_path / 'hydra'}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "train", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("rank 1" in e and "checkpoint-00000003" in e for e in errors), proc.stderr[-3000:]
    assert not (tmp_path / "node1" / "checkpoints").exists() and not (tmp_path / "node0" / "summary.json").exists()


# --- two runs, one folder ----------------------------------------------------------------------

def test_second_run_into_a_busy_output_dir_refuses(tiny_model_dir, shards, tmp_path):
    from train.run_lock import RunLock

    out = tmp_path / "run"
    holder = RunLock(out)
    holder.acquire()
    try:
        with pytest.raises(CheckpointError) as err:
            train(compose(tiny_overrides(tiny_model_dir, shards, out, "trainer.max_steps=1")))
        assert f"pid {os.getpid()}" in str(err.value) and "\n" not in str(err.value)
        assert not (out / "checkpoints").exists()
    finally:
        holder.release()
    assert train(compose(tiny_overrides(tiny_model_dir, shards, out, "trainer.max_steps=1"))).step == 1


def test_a_killed_run_does_not_leave_its_output_dir_locked(tmp_path):
    from train.run_lock import RunLock

    script = ("import sys, time; from train.run_lock import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
              "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match="in use"):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


# --- non-finite losses ------------------------------------------------------------------------

def test_a_nonfinite_step_is_skipped_and_counted(tiny_model_dir, shards, tmp_path, monkeypatch):
    import train.loop as loop
    from train.ema import EMA
    from train.task import DiffusionTask

    calls, call, ema_updates, update = [], DiffusionTask.__call__, [], EMA.update

    def nan_on_second_step(self, batch):
        loss, metrics = call(self, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), metrics

    monkeypatch.setattr(DiffusionTask, "__call__", nan_on_second_step)
    monkeypatch.setattr(EMA, "update", lambda self, module: ema_updates.append(1) or update(self, module))
    logged, log_metrics = [], loop.log_metrics
    monkeypatch.setattr(loop, "log_metrics", lambda *args: logged.append(log_metrics(*args)) or logged[-1])
    out = tmp_path / "run"
    run = train(compose(tiny_overrides(tiny_model_dir, shards, out, "trainer.max_steps=3", "trainer.ema=0.9",
                                       "trainer.checkpoint_every=0", "trainer.lr_scheduler=cosine",
                                       "trainer.warmup_steps=1", "optim.lr=1e-3")))
    assert run.step == 3 and run.summary["skipped_nonfinite"] == 1
    assert [m["train/skipped_nonfinite"] for m in logged] == [0, 1, 1] and math.isnan(logged[1]["train/loss"])
    assert run.lr_scheduler.last_epoch == 2 and len(ema_updates) == 2  # neither advanced on the skipped step
    assert all(torch.isfinite(p).all() for p in run.adapter.parameters())
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "ip-adapter.safetensors")).values())


def test_nonfinite_steps_in_a_row_stop_the_run_with_one_line(tiny_model_dir, shards, tmp_path):
    from train.loop import NonFiniteLoss

    out = tmp_path / "run"
    cfg = compose(tiny_overrides(tiny_model_dir, shards, out, "trainer.max_steps=6", "trainer.noise_offset=1e39",
                                 "trainer.max_nonfinite_steps=2", "trainer.checkpoint_every=1"))
    with pytest.raises(NonFiniteLoss, match="2 steps in a row") as err:
        train(cfg)
    assert "\n" not in str(err.value) and not (out / "ip-adapter.safetensors").exists()
    # Step 1 was skipped, so its checkpoint holds the untouched (finite) weights; step 2 stopped the run.
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-00000001"]
    weights = load_file(str(out / "checkpoints" / "checkpoint-00000001" / "adapter.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_nonfinite_checkpoint_or_export_is_refused(tmp_path):
    from train.checkpoint import check_finite, save_parts

    module = torch.nn.Linear(2, 2)
    with torch.no_grad():
        module.weight[0, 0] = float("inf")
    manager = CheckpointManager(tmp_path / "checkpoints", keep=2)
    with pytest.raises(CheckpointError, match=r"checkpoint-00000001: adapter tensor 'weight' holds inf/NaN") as err:
        save_parts(manager, 1, {"adapter": module}, [{}], {"step": 1}, "")
    assert "\n" not in str(err.value) and not (tmp_path / "checkpoints").exists()
    with pytest.raises(CheckpointError, match="refusing to write the export: adapter tensor 'weight'"):
        check_finite({"adapter": module}, "export")


# --- the documented shard patterns -------------------------------------------------------------

def test_brace_pattern_in_the_documented_shell_form_composes_and_expands():
    from train.preflight import quote_shards

    docs = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    words = [w for line in docs.splitlines() if line.lstrip().startswith(("python -m train", "./launch.sh"))
             for w in shlex.split(line.split("#")[0].rstrip().rstrip("\\")) if w.startswith("data.shards=") and "{" in w]
    assert words, "the docs show a brace pattern"
    for word in words:  # what the shell hands python -m train, which quotes a bare pattern for Hydra
        compose(quote_shards(["model.path=/m", word, "output_dir=/o"]))
    cfg = compose(["model.path=/m", "data.shards=\"/x/{00000..00099}.tar\"", "output_dir=/o"])
    urls = expand_shards(cfg.data.shards)
    assert len(urls) == 100 and urls[0] == "/x/00000.tar" and urls[-1] == "/x/00099.tar"


# --- unusable paths, wandb without a key -------------------------------------------------------

def test_unusable_output_dir_or_model_path_is_one_line(tiny_model_dir, shards, tmp_path, monkeypatch):
    from train.checks import check_config

    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = {f"output_dir={a_file}": "is a file", f"output_dir={a_file}/run": "is a file",
             f"model.path={a_file}": "model.path"}
    for override, words in cases.items():
        args = tiny_overrides(tiny_model_dir, shards, tmp_path / "run")
        with pytest.raises(ConfigError, match=words) as err:
            check_config(compose([*args, override]))
        assert "\n" not in str(err.value), override
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as root every folder is writable
    with pytest.raises(ConfigError, match="not writable"):
        check_config(compose(tiny_overrides(tiny_model_dir, shards, tmp_path / "run")))


def test_cli_output_dir_that_is_a_file_exits_2_without_traceback(tiny_model_dir, shards, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    args = tiny_overrides(tiny_model_dir, shards, a_file, f"hydra.run.dir={tmp_path / 'hydra'}")
    proc = subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: output_dir=")


def test_wandb_online_without_a_key_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    from train.loggers import build_trackers

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".netrc").write_text("machine example.com login me password secret\n")
    with caplog.at_level(logging.WARNING, logger="train.loggers"):
        trackers = build_trackers("wandb", mode="online", run_dir=tmp_path)
    assert trackers.init_kwargs["wandb"]["mode"] == "offline"
    assert len(caplog.records) == 1 and "offline" in caplog.records[0].getMessage()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password k3y\n")
    assert build_trackers("wandb", mode="online", run_dir=tmp_path).init_kwargs["wandb"]["mode"] == "online"
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k3y")
    assert build_trackers("wandb", mode="online", run_dir=tmp_path).init_kwargs["wandb"]["mode"] == "online"


# --- re-running a finished run -------------------------------------------------------------------

def test_rerunning_a_finished_run_is_one_line_and_trains_nothing(tiny_model_dir, shards, tmp_path, monkeypatch, caplog):
    import train.training as training

    out = tmp_path / "run"
    cfg = compose(tiny_overrides(tiny_model_dir, shards, out, "trainer.max_steps=2"))
    train(cfg)
    export = out / "ip-adapter.safetensors"
    before = export.read_bytes()

    def no_build(*args, **kwargs):
        raise AssertionError("a finished run must not build the model again")

    monkeypatch.setattr(training, "build_run", no_build)
    with caplog.at_level(logging.INFO, logger="train"):
        assert train(cfg) is None
    assert f"already done: {export} (step 2)" in [r.getMessage() for r in caplog.records]
    assert export.read_bytes() == before
    monkeypatch.undo()
    more = train(compose(tiny_overrides(tiny_model_dir, shards, out, "trainer.max_steps=3")))  # a longer run goes on
    assert more.step == 3 and more.summary["resumed_from"].endswith("checkpoint-00000002")
