"""Checkpoints: pickle-free round trips, exact resume, crash-safe writes, preemption, export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from instantstyle.export import read_adapter_file
from train.checkpoint import CheckpointError, CheckpointManager, decode_state, encode_state, read_state
from train.config import compose
from train.export import export_checkpoint
from train.export import main as export_main
from train.loop import StopSignal
from train.training import train
from tests.helpers import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
# Cosine warmup, EMA, noise offset and CFG drops: every RNG and state the resume must restore.
RESUME_ARGS = ("trainer.max_steps=4", "trainer.checkpoint_every=2", "trainer.lr_scheduler=cosine",
               "trainer.warmup_steps=1", "trainer.ema=0.9", "trainer.noise_offset=0.05",
               "trainer.record_sample_keys=true", "optim.lr=1e-3", "data.drop_image_prob=0.3")


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, shards, tmp_path_factory):
    """Four steps in one go (the reference)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    run = train(compose(tiny_overrides(tiny_model_dir, shards, out, *RESUME_ARGS)))
    return out, run


def test_state_codec_round_trips_optimizer_rng_and_numpy():
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(params)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    state = {"opt": optimizer.state_dict(), "np": np.random.get_state(), "tuple": (1, (2, 3), None)}
    tensors: dict = {}
    tree = json.loads(json.dumps(encode_state(state, tensors)))  # must survive JSON
    back = decode_state(tree, tensors)
    assert back["tuple"] == (1, (2, 3), None)
    assert back["np"][0] == "MT19937" and np.array_equal(back["np"][1], state["np"][1])
    assert set(back["opt"]["state"]) == {0, 1}  # int param ids, or load_state_dict silently drops them
    assert torch.equal(back["opt"]["state"][1]["exp_avg"], optimizer.state_dict()["state"][1]["exp_avg"])
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params])
    fresh.load_state_dict(back["opt"])
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg_sq"], optimizer.state_dict()["state"][0]["exp_avg_sq"])


def test_checkpoint_folder_holds_only_adapter_state_and_no_pickle(uninterrupted):
    out, _run = uninterrupted
    folder = out / "checkpoints" / "checkpoint-00000004"
    assert sorted(p.name for p in folder.iterdir()) == [
        "adapter.json", "adapter.safetensors", "config.yaml", "ema.json", "ema.safetensors", "lr_scheduler.json",
        "optimizer.json", "optimizer.safetensors", "ranks.json", "trainer_state.json"]
    adapter = load_file(str(folder / "adapter.safetensors"))
    assert all(k.startswith(("image_proj.", "layers.")) for k in adapter)  # never the frozen base
    assert sum(p.stat().st_size for p in folder.iterdir()) < 2_000_000
    ranks = read_state(folder, "ranks")
    assert len(ranks) == 1 and ranks[0]["data"]["samples_seen"] == 8
    assert json.loads((folder / "trainer_state.json").read_text())["step"] == 4


def test_resume_after_preemption_is_bitwise_identical(uninterrupted, tiny_model_dir, shards, tmp_path, monkeypatch):
    ref_dir, ref = uninterrupted
    out = tmp_path / "resumed"
    cfg = compose(tiny_overrides(tiny_model_dir, shards, out, *RESUME_ARGS))
    calls = []
    monkeypatch.setattr(StopSignal, "agreed", lambda self, acc: calls.append(1) or len(calls) == 2)
    first = train(cfg)  # "preempted" after step 2: checkpoint, no export
    assert first.summary["preempted"] and first.step == 2 and not (out / "ip-adapter.safetensors").exists()
    monkeypatch.undo()
    second = train(cfg)  # resume=auto
    assert second.summary["resumed_from"].endswith("checkpoint-00000002") and second.step == 4
    # Bitwise: CPU kernels are deterministic at a fixed thread count and every RNG stream is restored.
    for key, value in ref.adapter.state_dict().items():
        assert torch.equal(value, second.adapter.state_dict()[key]), key
    ref_file, _ = read_adapter_file(ref_dir / "ip-adapter.safetensors")
    new_file, _ = read_adapter_file(out / "ip-adapter.safetensors")
    assert all(torch.equal(ref_file[k], new_file[k]) for k in ref_file)
    ref_opt = load_file(str(ref_dir / "checkpoints/checkpoint-00000004/optimizer.safetensors"))
    new_opt = load_file(str(out / "checkpoints/checkpoint-00000004/optimizer.safetensors"))
    assert all(torch.equal(ref_opt[k], new_opt[k]) for k in ref_opt)
    # Same samples in the same order, step by step.
    ref_keys = (ref_dir / "sample_keys" / "rank0.txt").read_text().splitlines()
    assert (out / "sample_keys" / "rank0.txt").read_text().splitlines() == ref_keys and len(ref_keys) == 8


def test_interrupted_write_leaves_previous_checkpoint_resumable(uninterrupted, tiny_model_dir, shards, tmp_path):
    import shutil

    ref_dir, _ = uninterrupted
    out = tmp_path / "run"
    shutil.copytree(ref_dir / "checkpoints", out / "checkpoints")
    # A kill mid-write leaves a tmp- folder; a copy cut short leaves a checkpoint without trainer_state.json.
    (out / "checkpoints" / "tmp-00000006-deadbeef").mkdir()
    (out / "checkpoints" / "tmp-00000006-deadbeef" / "adapter.safetensors").write_bytes(b"\0" * 10)
    (out / "checkpoints" / "checkpoint-00000006").mkdir()
    (out / "checkpoints" / "checkpoint-00000006" / "adapter.safetensors").write_bytes(b"\0" * 10)
    assert CheckpointManager(out / "checkpoints", keep=3).newest_usable().name == "checkpoint-00000004"
    run = train(compose(tiny_overrides(tiny_model_dir, shards, out, *RESUME_ARGS, "trainer.max_steps=5")))
    assert run.summary["resumed_from"].endswith("checkpoint-00000004") and run.step == 5
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "checkpoint-00000005" in names and not any(n.startswith("tmp-") for n in names)


def test_resume_into_other_block_set_is_a_one_line_error(uninterrupted, tiny_model_dir, shards, tmp_path):
    ref_dir, _ = uninterrupted
    ckpt = ref_dir / "checkpoints" / "checkpoint-00000004"
    cfg = compose(tiny_overrides(tiny_model_dir, shards, tmp_path / "x", "blocks=layout", f"resume={ckpt}"))
    with pytest.raises(CheckpointError, match=r"block set \['up_blocks.0.attentions.1'\]") as err:
        train(cfg)
    assert "\n" not in str(err.value)


def test_export_cli_matches_training_export(uninterrupted, tmp_path):
    ref_dir, run = uninterrupted
    ckpt = ref_dir / "checkpoints" / "checkpoint-00000004"
    export_main([str(ckpt), "--out", str(tmp_path / "ema.safetensors"), "--ema"])
    final, _ = read_adapter_file(ref_dir / "ip-adapter.safetensors")  # trained with EMA: the EMA weights
    ema, meta = read_adapter_file(tmp_path / "ema.safetensors")
    assert final.keys() == ema.keys() and all(torch.equal(final[k], ema[k]) for k in final)
    assert meta["step"] == "4" and json.loads(meta["target_blocks"]) == ["up_blocks.0.attentions.1"]
    raw, _ = read_adapter_file(export_checkpoint(ckpt, tmp_path / "raw.safetensors", dtype="fp16"))
    weights = load_file(str(ckpt / "adapter.safetensors"))
    assert raw["image_proj.proj.weight"].dtype == torch.float16
    assert torch.equal(raw["image_proj.proj.weight"], weights["image_proj.proj.weight"].half())


def test_export_onto_another_base_is_a_one_line_error(uninterrupted, tmp_path, tiny_model_dir, capsys):
    from diffusers import UNet2DConditionModel

    ref_dir, _ = uninterrupted
    config = dict(UNet2DConditionModel.load_config(tiny_model_dir, subfolder="unet"))
    config.update(cross_attention_dim=48, projection_class_embeddings_input_dim=80)
    UNet2DConditionModel.from_config(config).save_pretrained(tmp_path / "other" / "unet")
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(ref_dir / "checkpoints" / "checkpoint-00000004"), "--out", str(tmp_path / "x.safetensors"),
                     "--base", str(tmp_path / "other")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: checkpoint-00000004 does not fit the base")
    assert "\n" not in err and "Traceback" not in err


def test_sigterm_checkpoints_and_exits_zero(tiny_model_dir, shards, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_model_dir, shards, out, "trainer.max_steps=500", "trainer.checkpoint_every=0",
                          "trainer.record_sample_keys=true")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    keys = out / "sample_keys" / "rank0.txt"
    deadline = time.time() + 120
    while not (keys.exists() and len(keys.read_text().splitlines()) >= 4) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preempted"] and 2 <= summary["step"] < 500
    assert CheckpointManager(out / "checkpoints", 3).newest_usable().name == f"checkpoint-{summary['step']:08d}"
    assert not (out / "ip-adapter.safetensors").exists()


def test_rotate_deletes_only_its_own_stale_temp_folders(tmp_path, monkeypatch):
    import train.checkpoint as checkpoint

    manager = CheckpointManager(tmp_path, keep=2)
    foreign = tmp_path / "tmp-00000005-0other00"  # another process's write in progress
    foreign.mkdir()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        manager.save(1, {"adapter": {"w": torch.ones(2)}}, {"step": 1}, "")
    monkeypatch.undo()
    assert list(tmp_path.glob("tmp-*")) == [foreign]  # this manager's failed write is gone at once
    manager.save(2, {"adapter": {"w": torch.ones(2)}}, {"step": 2}, "")
    assert foreign.is_dir()
    assert [p.name for p in manager.complete()] == ["checkpoint-00000002"]
