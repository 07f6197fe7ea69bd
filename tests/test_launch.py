"""Multi-process training through `accelerate launch`, and how launch.sh builds its command."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
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
save, export = checkpoint.CheckpointManager.save, trainer.export_adapter
checkpoint.CheckpointManager.save = lambda self, *a, **k: calls.append("checkpoint") or save(self, *a, **k)
trainer.export_adapter = lambda *a, **k: calls.append("export") or export(*a, **k)
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
    # PYTHONPATH: ranks.py runs from tmp_path, and must import this checkout rather than an installed copy.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
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


# Variables launch.sh reads that the caller's shell may hold; each test sets what it needs.
LAUNCH_ENV = ("CUDA_VISIBLE_DEVICES", "NUM_GPUS", "NUM_CPU_PROCESSES", "NUM_CPU_THREADS", "OMP_NUM_THREADS",
              "MAIN_PORT", "MASTER_PORT", "NUM_MACHINES", "MACHINE_RANK", "MAIN_ADDRESS", "ACCELERATE_CONFIG",
              "LAUNCH_DRY_RUN", "INSTANTSTYLE_ERROR_FILE")


def launch_env(**env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_ENV}
    return {**base, **env}


def run_launch(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "launch.sh"), *args], env=launch_env(**{"LAUNCH_DRY_RUN": "1", **env}),
                          capture_output=True, text=True, timeout=60)


def dry_run(args: list[str], **env: str) -> str:
    proc = run_launch(args, **env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]  # DESIGN.md: the command is the last line


def fake_bin(tmp_path: Path, **scripts: str) -> str:
    """A PATH whose first folder holds the given executables (fake nvidia-smi, scontrol, accelerate)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (fake / name).write_text(body)
        (fake / name).chmod(0o755)
    return f"{fake}:{os.environ['PATH']}"


def port_of(command: str) -> int:
    words = command.split()
    return int(words[words.index("--main_process_port") + 1])


def test_launch_sh_single_machine_commands():
    assert dry_run(["trainer.max_steps=3"], NUM_GPUS="0", NUM_CPU_THREADS="1") == (
        "accelerate launch --quiet --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no "
        "--num_cpu_threads_per_process 1 "
        "-m train trainer.max_steps=3")
    assert dry_run(["a=b"], NUM_GPUS="0", NUM_CPU_PROCESSES="2").startswith(
        "ACCELERATE_USE_CPU=1 accelerate launch --quiet --multi_gpu --num_processes 2")
    gpu = dry_run(["x=y"], NUM_GPUS="8", ACCELERATE_CONFIG="fsdp")
    assert f"--config_file {REPO}/configs/accelerate/fsdp.yaml --num_processes 8 --num_machines 1 --machine_rank 0" in gpu
    assert "-m experiment=demo" not in dry_run([], NUM_GPUS="0") and "experiment=demo" in dry_run([], NUM_GPUS="0")


def test_launch_sh_reads_slurm(tmp_path):
    path = fake_bin(tmp_path, scontrol="#!/bin/sh\nprintf 'gpu-node07\\ngpu-node08\\n'\n")
    out = dry_run(["x=y"], NUM_GPUS="4", SLURM_JOB_ID="123", SLURM_NNODES="2", SLURM_NODEID="1",
                  SLURM_JOB_NODELIST="gpu-node[07-08]", MAIN_PORT="29600", PATH=path)
    assert ("--num_processes 8 --num_machines 2 --machine_rank 1 --main_process_ip gpu-node07 "
            "--main_process_port 29600 -m train x=y") in out


def test_launch_sh_rejects_unknown_accelerate_config():
    proc = run_launch(["x=y"], ACCELERATE_CONFIG="zero9")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: ACCELERATE_CONFIG=zero9 — use ddp, fsdp or a file")


EIGHT_GPUS = "#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: NVIDIA H100 (UUID: GPU-$i)\"; done\n"


def test_launch_sh_counts_only_the_gpus_cuda_visible_devices_shows(tmp_path):
    path = fake_bin(tmp_path, **{"nvidia-smi": EIGHT_GPUS})
    assert "--num_processes 8 " in dry_run(["x=y"], PATH=path)
    assert "--num_processes 4 " in dry_run(["x=y"], PATH=path, CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert "--num_processes 2 " in dry_run(["x=y"], PATH=path, CUDA_VISIBLE_DEVICES="GPU-5,GPU-7")
    # CUDA stops reading the list at the first invalid index.
    assert "--num_processes 2 " in dry_run(["x=y"], PATH=path, CUDA_VISIBLE_DEVICES="0,1,-1,3")
    for hidden in ("", "-1", "NoDevFiles"):  # set but empty (or SLURM's marker) means no GPU at all
        assert "launch --quiet --cpu --num_processes 1 " in dry_run(["x=y"], PATH=path, CUDA_VISIBLE_DEVICES=hidden)
    assert "--num_processes 3 " in dry_run(["x=y"], PATH=path, CUDA_VISIBLE_DEVICES="0,1", NUM_GPUS="3")


@pytest.mark.parametrize("slurm", [{"SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "1"},
                                   {"SLURM_NTASKS": "8", "SLURM_NNODES": "2"},
                                   {"SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2", "SLURM_NNODES": "2"}])
def test_launch_sh_refuses_more_than_one_slurm_task_per_node(slurm):
    proc = run_launch(["x=y"], NUM_GPUS="8", SLURM_JOB_ID="7", **slurm)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("error: launch.sh needs one SLURM task per node (srun --ntasks-per-node=1); "
                                   "accelerate starts one process per GPU itself")


def test_launch_sh_accepts_one_slurm_task_per_node(tmp_path):
    path = fake_bin(tmp_path, scontrol="#!/bin/sh\nprintf 'n1\\nn2\\n'\n")
    slurm = dict(SLURM_JOB_ID="7", SLURM_NNODES="2", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1",
                 SLURM_JOB_NODELIST="n[1-2]", PATH=path)
    assert "--num_processes 16 --num_machines 2" in dry_run(["x=y"], NUM_GPUS="8", **slurm)
    # The srun step is what runs us: one task per node there wins over the batch job's 8 tasks per node.
    step = {**slurm, "SLURM_NTASKS_PER_NODE": "8", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2"}
    assert "--num_processes 16 --num_machines 2" in dry_run(["x=y"], NUM_GPUS="8", **step)


def test_launch_sh_picks_a_free_port_on_one_machine():
    port = port_of(dry_run(["x=y"], NUM_GPUS="2"))
    assert port != 29500
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # it was free a moment ago
    assert port_of(dry_run(["x=y"], NUM_GPUS="0", NUM_CPU_PROCESSES="2")) != 29500


def test_launch_sh_nodes_agree_on_the_port(tmp_path):
    path = fake_bin(tmp_path, scontrol="#!/bin/sh\nprintf 'n1\\nn2\\n'\n")
    slurm = dict(NUM_GPUS="8", SLURM_JOB_ID="123456", SLURM_NNODES="2", SLURM_JOB_NODELIST="n[1-2]", PATH=path)
    ports = {port_of(dry_run(["x=y"], SLURM_NODEID=str(rank), **slurm)) for rank in (0, 1)}
    assert ports == {20000 + 123456 % 20000}
    assert port_of(dry_run(["x=y"], MASTER_PORT="31000", **slurm)) == 31000
    assert port_of(dry_run(["x=y"], MASTER_PORT="31000", MAIN_PORT="31001", **slurm)) == 31001
    # Without SLURM every node must still compute the same port, so no random choice there.
    manual = dict(NUM_GPUS="8", NUM_MACHINES="2", MAIN_ADDRESS="10.0.0.1")
    assert port_of(dry_run(["x=y"], MACHINE_RANK="1", **manual)) == 29500
    assert port_of(dry_run(["x=y"], MASTER_PORT="31000", **manual)) == 31000


def test_launch_sh_cpu_runs_use_the_librarys_thread_choice_unless_told(tmp_path, shards):
    from instantstyle.threads import default_threads

    chosen = dry_run(["x=y"], NUM_GPUS="0", NUM_CPU_PROCESSES="2").split("--num_cpu_threads_per_process ")[1]
    assert int(chosen.split()[0]) in {default_threads(2), max(1, default_threads(2) - 1), default_threads(2) + 1}
    assert "--num_cpu_threads_per_process 2 " in dry_run(["x=y"], NUM_GPUS="0", NUM_CPU_THREADS="2")
    assert "--num_cpu_threads_per_process 4 " in dry_run(["x=y"], NUM_GPUS="0", OMP_NUM_THREADS="4")
    assert "--num_cpu_threads_per_process" not in dry_run(["x=y"], NUM_GPUS="2")
    # The launcher itself (and the demo's other steps) run with the same thread count.
    seen = tmp_path / "seen"
    path = fake_bin(tmp_path, accelerate=f'#!/bin/sh\necho "$OMP_NUM_THREADS $*" > {seen}\n')
    env = launch_env(NUM_GPUS="0", PATH=path, OMP_NUM_THREADS="1")
    valid = f"data.shards={shards}/*.tar"  # the preflight runs for real
    assert subprocess.run(["bash", str(REPO / "launch.sh"), valid], env=env, timeout=120).returncode == 0
    assert seen.read_text().startswith("1 launch --quiet --cpu")
    env["NUM_CPU_THREADS"] = "3"
    assert subprocess.run(["bash", str(REPO / "launch.sh"), valid], env=env, timeout=120).returncode == 0
    assert seen.read_text().startswith("3 launch --quiet --cpu")


def default_signal_dispositions() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def signal_launch(tmp_path: Path, shards: str, fake_accelerate: str, sig: signal.Signals) -> tuple[int, str]:
    """Run launch.sh over a fake `accelerate`, signal launch.sh once the fake runs; (exit status, marker text)."""
    marker = tmp_path / "marker"
    env = launch_env(NUM_GPUS="0", MARKER=str(marker), PATH=fake_bin(tmp_path, accelerate=fake_accelerate))
    # As from a terminal: a runner started as a background job of a script ignores SIGINT, and a shell
    # started with a signal ignored can never trap it (POSIX), so the default disposition is restored here.
    proc = subprocess.Popen(["bash", str(REPO / "launch.sh"), f"data.shards={shards}/*.tar"], env=env,
                            start_new_session=True,
                            preexec_fn=default_signal_dispositions)
    pid_file = Path(f"{marker}.pid")
    try:
        deadline = time.monotonic() + 120  # after the preflight (a few seconds)
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # the fake has installed its traps before writing the pid
        proc.send_signal(sig)
        return proc.wait(timeout=30), marker.read_text().strip() if marker.exists() else ""
    finally:
        if proc.poll() is None:
            proc.kill()
        if pid_file.exists():  # an orphaned fake trainer (the bug) must not outlive the test
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


# Stands in for `accelerate launch`: records its pid, then on TERM/INT writes which signal came and exits 77.
FAKE_TRAINER = '''#!/usr/bin/env bash
trap 'echo TERM > "$MARKER"; exit 77' TERM
trap 'echo INT > "$MARKER"; exit 77' INT
echo $$ > "$MARKER.pid"
while :; do sleep 0.05; done
'''


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_launch_sh_forwards_signals_to_training_and_returns_its_status(tmp_path, shards, sig):
    # 77 is the trainer's own exit status, not launch.sh's death by the signal.
    assert signal_launch(tmp_path, shards, FAKE_TRAINER, sig) == (77, sig.name[3:])


# Like accelerate's one-process (--cpu) launcher: dies at once on TERM, while the trainer it started in the
# same process group takes a while to checkpoint before it exits.
FAKE_SIMPLE_LAUNCHER = '''#!/usr/bin/env bash
bash -c 'trap "sleep 1; echo saved > \\"$MARKER\\"; exit 0" TERM
         echo $$ > "$MARKER.pid"
         while :; do sleep 0.05; done' &
wait
'''


def test_launch_sh_returns_only_after_the_trainer_has_checkpointed(tmp_path, shards):
    # The launcher's status (it died of the TERM), but only once the trainer has written its checkpoint.
    assert signal_launch(tmp_path, shards, FAKE_SIMPLE_LAUNCHER, signal.SIGTERM) == (128 + signal.SIGTERM, "saved")


@pytest.mark.parametrize("name", ["NUM_GPUS", "NUM_CPU_PROCESSES", "NUM_MACHINES", "MACHINE_RANK", "MAIN_PORT",
                                  "MASTER_PORT", "NUM_CPU_THREADS", "OMP_NUM_THREADS", "SLURM_JOB_ID", "SLURM_NNODES"])
def test_launch_sh_numbers_are_whole_numbers_and_never_run_as_code(tmp_path, name):
    # bash arithmetic evaluates a variable's value: 'HOME[$(touch F)]' would run the command.
    for value in ("HOME[$(touch F)]", "abc", "1.5", "-1", "1e3", "0x10"):
        proc = subprocess.run(["bash", str(REPO / "launch.sh"), "x=y"], cwd=tmp_path, capture_output=True, text=True,
                              env=launch_env(LAUNCH_DRY_RUN="1", **{"NUM_GPUS": "0", name: value}), timeout=60)
        assert proc.returncode == 2 and proc.stdout == "", (name, value, proc.stdout)
        assert proc.stderr.startswith(f"error: {name}={value} — give a whole number"), proc.stderr
        assert len(proc.stderr.splitlines()) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("env, message", [
    ({"NUM_MACHINES": "0"}, "error: NUM_MACHINES=0 — give a whole number ≥ 1"),
    ({"NUM_CPU_PROCESSES": "0"}, "error: NUM_CPU_PROCESSES=0 — give a whole number ≥ 1"),
    ({"MAIN_PORT": "70000"}, "error: MAIN_PORT=70000 — give a whole number from 1 to 65535"),
    ({"NUM_MACHINES": "2", "MACHINE_RANK": "2"}, "error: MACHINE_RANK=2 — give a whole number from 0 to 1"),
    ({"LAUNCH_DRY_RUN": "yes"}, "error: LAUNCH_DRY_RUN=yes — give 1 (print the command) or 0 (run)"),
])
def test_launch_sh_numbers_out_of_range_are_one_line(env, message):
    proc = run_launch(["x=y"], **env)
    assert proc.returncode == 2 and proc.stderr.strip() == message


def test_launch_sh_leaves_omp_num_threads_alone_where_it_does_not_read_it():
    # OpenMP also takes lists ("4,2"); launch.sh reads OMP_NUM_THREADS only as the CPU thread default.
    assert "--num_cpu_threads_per_process 2 " in dry_run(["x=y"], NUM_GPUS="0", NUM_CPU_THREADS="2",
                                                         OMP_NUM_THREADS="4,2")
    assert "--config_file" in dry_run(["x=y"], NUM_GPUS="8", OMP_NUM_THREADS="4,2")


def test_launch_sh_reads_leading_zeros_as_decimal():
    assert "--num_processes 8 " in dry_run(["x=y"], NUM_GPUS="08")  # not an octal error


def test_launch_sh_dry_run_zero_runs_in_the_callers_folder(tmp_path, shards):
    seen = tmp_path / "seen"
    here = tmp_path / "here"
    shutil.copytree(shards, here / "d")  # the preflight reads the shards where the caller is
    path = fake_bin(tmp_path, accelerate=f'#!/bin/sh\necho "$PWD $*" > {seen}\n')
    proc = subprocess.run(["bash", str(REPO / "launch.sh"), "data.shards=d/*.tar", "output_dir=runs/a"], cwd=here,
                          env=launch_env(LAUNCH_DRY_RUN="0", NUM_GPUS="0", NUM_CPU_THREADS="1", PATH=path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # Ran (not printed), from the caller's folder, with the relative paths as typed.
    assert seen.read_text().startswith(f"{here} launch --quiet --cpu") and proc.stdout == ""
    assert seen.read_text().rstrip().endswith("-m train data.shards=d/*.tar output_dir=runs/a")


NO_GPU_SMI = "#!/bin/sh\necho 'No devices were found'\nexit 6\n"


@pytest.mark.parametrize("env, asked", [({"NUM_GPUS": "2"}, "NUM_GPUS=2"),
                                        ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES=0,1")])
def test_launch_sh_asking_for_gpus_on_a_machine_without_says_so(tmp_path, env, asked):
    path = fake_bin(tmp_path, **{"nvidia-smi": NO_GPU_SMI, "accelerate": "#!/bin/sh\nexit 0\n"})
    proc = subprocess.run(["bash", str(REPO / "launch.sh"), "x=y"], env=launch_env(PATH=path, **env),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {asked}, but this machine has no GPU (nvidia-smi finds none); NUM_GPUS=0 trains on the CPU")
    too_many = subprocess.run(["bash", str(REPO / "launch.sh"), "x=y"], capture_output=True, text=True, timeout=60,
                              env=launch_env(PATH=fake_bin(tmp_path, **{"nvidia-smi": EIGHT_GPUS}), NUM_GPUS="9"))
    assert too_many.stderr.strip() == "error: NUM_GPUS=9, but this machine has 8 GPU(s); use NUM_GPUS=8 or fewer"


def test_launch_sh_error_met_in_training_ends_in_the_one_error_line(tmp_path, shards):
    """Through the real accelerate launcher: no CalledProcessError traceback, the trainer's line last, exit 2."""
    (tmp_path / "broken.safetensors").write_text("not a safetensors file")  # the preflight sees only that it exists
    proc = subprocess.run(["bash", str(REPO / "launch.sh"), f"data.shards={shards}/*.tar", "data.resolution=64",
                           "adapter.init_from=broken.safetensors", "output_dir=run"],
                          cwd=tmp_path, env=launch_env(NUM_GPUS="0", NUM_CPU_THREADS="1", HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: adapter.init_from=broken.safetensors: cannot read adapter file"), proc.stderr


# A launcher that reports every rank's failure in a box, as torchrun does under `accelerate launch --quiet`.
FAKE_FAILING_LAUNCHER = f"""#!/bin/sh
touch "$MARKER"
echo '{"=" * 60}' >&2; echo 'train FAILED' >&2; echo 'Root Cause (first observed failure):' >&2
exit 1
"""


@pytest.mark.parametrize("mistake, line", [
    (["optim.lr=-1"], "error: optim.lr must be > 0 (got -1.0)"),
    (["data.shards=nope/*.tar"], "error: data.shards='nope/*.tar' matched no shards — give a brace pattern, glob, "
                                 "list or URL"),
    (["output_dir=/proc/run"], "error: output_dir=/proc/run lies under /proc; choose a folder elsewhere"),
    (["blocks.targets=[up_blocks.9.attentions.1]"], "error: unknown block 'up_blocks.9.attentions.1' — valid: "),
])
def test_launch_sh_checks_the_run_once_before_any_rank_starts(tmp_path, shards, mistake, line):
    """A mistake the checks can see is one line, whatever the number of processes: the launcher never starts."""
    marker = tmp_path / "launched"
    path = fake_bin(tmp_path, accelerate=FAKE_FAILING_LAUNCHER)
    args = [f"data.shards={shards}/*.tar", *mistake]
    proc = subprocess.run(["bash", str(REPO / "launch.sh"), *args], cwd=tmp_path, capture_output=True, text=True,
                          env=launch_env(NUM_GPUS="0", NUM_CPU_PROCESSES="2", NUM_CPU_THREADS="1", PATH=path,
                                         MARKER=str(marker), HF_HUB_OFFLINE="1"), timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and not marker.exists(), proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(line), proc.stderr
    assert not (tmp_path / "outputs").exists()  # nothing written for a refused run


def test_sdxl_experiment_logs_offline_on_compute_nodes():
    from train.config import compose

    assert compose(["experiment=sdxl_style"]).logger.mode == "offline"


def test_docs_give_the_frozen_sdxl_size_with_the_bigg_image_encoder():
    # The sizes each GPU holds under DDP, counted on the public configs (meta device) in bf16 (2 bytes/parameter).
    from instantstyle import reference_configs as configs

    def gib(*models) -> float:
        return sum(p.numel() for m in models for p in m.parameters()) * 2 / 2**30

    parts = {"UNet": gib(configs.build_unet()), "VAE": gib(configs.build_vae()),
             "text encoders": gib(configs.build_text_encoder("sdxl_text_encoder"),
                                  configs.build_text_encoder("sdxl_text_encoder_2")),
             "image encoder": gib(configs.build_image_encoder("openclip_bigg_vision"))}
    for text in ((REPO / "docs" / "cluster.md").read_text(), (REPO / "configs/accelerate/ddp.yaml").read_text()):
        assert f"{sum(parts.values()):.1f} GiB" in text
        for name, size in parts.items():
            assert f"{size:.2f}" in text, name
