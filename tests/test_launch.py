"""Multi-process training through `accelerate launch`, and how launch.sh builds its command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instantstyle.export import read_adapter_file

REPO = Path(__file__).resolve().parents[1]

# Runs train() in every rank, records which ranks wrote checkpoints/exports, and dumps each rank's weights.
RANK_SCRIPT = '''
import json, sys
from safetensors.torch import save_file
import train.checkpoint as checkpoint, train.training as trainer
from train.config import compose
out, calls = sys.argv[1], []
save, export = checkpoint.CheckpointManager.save, trainer.export_safetensors
checkpoint.CheckpointManager.save = lambda self, *a, **k: calls.append("checkpoint") or save(self, *a, **k)
trainer.export_safetensors = lambda *a, **k: calls.append("export") or export(*a, **k)
run = trainer.train(compose(sys.argv[2:]))
rank = run.accelerator.process_index
save_file({k: v.contiguous() for k, v in run.adapter.state_dict().items()}, f"{out}/rank{rank}.safetensors")
open(f"{out}/calls{rank}.json", "w").write(json.dumps(calls))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(os.environ.get("SKIP_MULTIPROCESS") == "1", reason="SKIP_MULTIPROCESS=1")
def test_two_cpu_processes_split_data_and_stay_in_sync(tiny_model_dir, tmp_path):
    from data_tools.synthetic import write_synthetic_shards

    write_synthetic_shards(tmp_path / "shards", num=32, size=64, per_shard=8)
    (tmp_path / "ranks.py").write_text(RANK_SCRIPT)
    out = tmp_path / "run"
    overrides = [f"model.path={tiny_model_dir}", f"data.shards={tmp_path}/shards/*.tar", "data.resolution=64",
                 "data.num_workers=0", "data.shuffle_buffer=8", "trainer.batch_size=2", "trainer.max_steps=3",
                 "trainer.checkpoint_every=2", "trainer.record_sample_keys=true", "optim.lr=1e-3", f"output_dir={out}"]
    # accelerate's --cpu flag multi-processes only via MPI; ACCELERATE_USE_CPU + torchrun gives gloo DDP.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(tmp_path / "ranks.py"), str(tmp_path), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["samples_seen"] == 12
    # Disjoint samples: each rank saw 6, none twice, none shared.
    keys = [[line.split()[1] for line in (out / "sample_keys" / f"rank{r}.txt").read_text().splitlines()] for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 6 and not set(keys[0]) & set(keys[1])
    assert len(set(keys[0])) == 6 and len(set(keys[1])) == 6
    # Identical weights on both ranks, equal to the export; they did train.
    weights = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    exported, _ = read_adapter_file(out / "ip-adapter.safetensors")
    assert torch.equal(exported["image_proj.proj.weight"], weights[0]["image_proj.proj.weight"])
    # Only the main process wrote checkpoints (steps 2 and 3) and the export.
    assert json.loads((tmp_path / "calls0.json").read_text()) == ["checkpoint", "checkpoint", "export"]
    assert json.loads((tmp_path / "calls1.json").read_text()) == []
    ranks = json.loads((out / "checkpoints" / "checkpoint-00000003" / "ranks.json").read_text())
    assert [r["data"]["samples_seen"] for r in ranks] == [6, 6]
    assert ranks[0]["rng"]["noise"] != ranks[1]["rng"]["noise"]  # distinct noise streams per rank


def dry_run(args: list[str], **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(REPO / "launch.sh"), *args], env={**base, "LAUNCH_DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_launch_sh_single_machine_commands():
    assert dry_run(["trainer.max_steps=3"], NUM_GPUS="0") == (
        "accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no "
        "-m train trainer.max_steps=3")
    assert dry_run(["a=b"], NUM_GPUS="0", NUM_CPU_PROCESSES="2").startswith(
        "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2")
    gpu = dry_run(["x=y"], NUM_GPUS="8", ACCELERATE_CONFIG="fsdp")
    assert "--config_file configs/accelerate/fsdp.yaml --num_processes 8 --num_machines 1 --machine_rank 0" in gpu
    assert "-m experiment=demo" not in dry_run([], NUM_GPUS="0") and "experiment=demo" in dry_run([], NUM_GPUS="0")


def test_launch_sh_reads_slurm(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node07\\ngpu-node08\\n'\n")
    (fake / "scontrol").chmod(0o755)
    out = dry_run(["x=y"], NUM_GPUS="4", SLURM_JOB_ID="123", SLURM_NNODES="2", SLURM_NODEID="1",
                  SLURM_JOB_NODELIST="gpu-node[07-08]", MAIN_PORT="29600", PATH=f"{fake}:{os.environ['PATH']}")
    assert ("--num_processes 8 --num_machines 2 --machine_rank 1 --main_process_ip gpu-node07 "
            "--main_process_port 29600 -m train x=y") in out


def test_launch_sh_rejects_unknown_accelerate_config():
    proc = subprocess.run(["bash", str(REPO / "launch.sh"), "x=y"], capture_output=True, text=True,
                          env={**os.environ, "ACCELERATE_CONFIG": "zero9", "LAUNCH_DRY_RUN": "1"})
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: ACCELERATE_CONFIG=zero9 — use ddp, fsdp, deepspeed_zero2 or a file")
