"""Hydra multirun puts each run in its own folder; train.sweep turns the folder into one table."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from instantstyle.export import read_adapter_file
import pytest
import yaml

from train.sweep import collect, main as sweep_main, markdown_table
from train.sweep_plot import plot_sweep
from train.sweep_points import expand_points, run_point_through_launch_sh, runs_through_launch_sh

REPO = Path(__file__).resolve().parents[1]


def test_multirun_makes_one_folder_per_run_and_a_summary_table(tiny_model_dir, tmp_path, capsys):
    from data_tools.synthetic import write_synthetic_shards

    write_synthetic_shards(tmp_path / "shards", num=16, size=64, per_shard=8)
    sweep = tmp_path / "sweep"
    args = ["-m", f"model.path={tiny_model_dir}", f"data.shards={tmp_path}/shards/*.tar", "data.resolution=64",
            "data.num_workers=0", "data.shuffle_buffer=8", "trainer.batch_size=2", "trainer.max_steps=2",
            "blocks=style,layout", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, blocks in (("0", "up_blocks.0.attentions.1"), ("1", "down_blocks.2.attentions.1")):
        run = sweep / job
        assert (run / "ip-adapter.safetensors").is_file() and (run / "checkpoints" / "checkpoint-00000002").is_dir()
        assert f"output_dir: {run}\n" in (run / "config.yaml").read_text()  # output_dir follows the job folder
        assert json.loads(read_adapter_file(run / "ip-adapter.safetensors")[1]["target_blocks"]) == [blocks]
        assert json.loads((run / "summary.json").read_text())["step"] == 2
    # An evaluation written into one run shows up as columns.
    (sweep / "1" / "eval").mkdir()
    (sweep / "1" / "eval" / "metrics.json").write_text(json.dumps(
        {"settings": [{"mean": {"style_similarity": 0.5, "text_alignment": 0.25, "content_leakage": None}}]}))
    records = collect(sweep)
    assert [r["overrides"][-1] for r in records] == ["blocks=style", "blocks=layout"]
    sweep_main([str(sweep), "--out", str(tmp_path / "sweep.md")])
    table, plot = capsys.readouterr().out.rsplit("plot: ", 1)
    assert table == (tmp_path / "sweep.md").read_text() == markdown_table(records)
    assert plot.strip() == str(tmp_path / "sweep.png") and (tmp_path / "sweep.png").is_file()
    lines = table.splitlines()
    assert lines[3] == ("| run | overrides | status | steps | loss (last 20%) | samples/s | style_similarity "
                        "| text_alignment |")
    loss = records[0]["loss"][0]
    assert lines[5].startswith(f"| 0 | blocks=style | finished | 2/2 | {loss:.4f} ± ") and lines[5].endswith("| – | – |")
    assert lines[6].startswith("| **1** ★ | blocks=layout | finished | 2/2 |") and lines[6].endswith("| 0.5000 | 0.2500 |")
    assert lines[1] == "Best by style_similarity (higher is better): run 1"
    assert "trainer.max_steps=2" in lines[0]  # shared overrides listed once


def write_point(sweep: Path, name: str, overrides: list[str], losses: list[float] | None, *, max_steps: int = 10,
                style: float | None = None, baseline: float | None = None) -> None:
    """A run folder as the trainer leaves it: Hydra's overrides, the loss history, the summary, an evaluation."""
    run = sweep / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if losses is None:
        return
    with open(run / "metrics.jsonl", "w") as f:
        for step, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": step, "train/loss": loss}) + "\n")
        f.write('{"step": 99, "train/lo')  # a line torn by a kill is skipped
    (run / "summary.json").write_text(json.dumps({"step": len(losses), "max_steps": max_steps, "preempted": False,
                                                  "samples_per_s": 3.0}))
    if style is not None:
        (run / "metrics.json").write_text(json.dumps({"settings": [{"mean": {"style_similarity": style}}],
                                                      "baselines": {"style_similarity": baseline}}))


def test_report_smooths_the_loss_marks_the_best_and_lists_unfinished_points(tmp_path, capsys):
    """Loss = mean ± spread of the last fifth; best by the chosen metric among finished points; others by status."""
    sweep = tmp_path / "sweep"
    losses = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.35]  # last fifth: steps 9 and 10
    write_point(sweep, "0", ["optim.lr=1e-4", "blocks=style"], losses, style=0.6, baseline=0.2)
    write_point(sweep, "1", ["optim.lr=3e-4", "blocks=style"], [0.5] * 10, style=0.7, baseline=0.2)
    write_point(sweep, "2", ["optim.lr=1e-4", "blocks=all"], [0.4] * 6)  # killed at step 6 of 10
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(
        {"hydra": {"overrides": {"task": ["optim.lr=1e-4,3e-4", "blocks=style,all"]}}}))
    records = collect(sweep)
    assert [(r["run"], r["status"]) for r in records] == [("0", "finished"), ("1", "finished"), ("2", "stopped"),
                                                          ("3", "pending")]
    assert records[0]["loss"] == pytest.approx((0.3, 0.05))
    assert records[3]["overrides"] == ["optim.lr=0.0003", "blocks=all"]  # from the sweep (as Hydra spells it)
    sweep_main([str(sweep)])
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "Best by style_similarity (higher is better): run 1"
    assert "| **1** ★ | optim.lr=3e-4 blocks=style | finished | 10/10 | 0.5000 ± 0.0000 | 3.00 | 0.7000 (baseline 0.2000) |" in out
    assert "| 3 | optim.lr=0.0003 blocks=all | pending | – | – | – | – |" in out
    assert out[-1] == f"plot: {sweep / 'sweep.png'}"
    sweep_main([str(sweep), "--best", "loss"])
    assert capsys.readouterr().out.splitlines()[1] == "Best by loss (lower is better): run 0"


def test_plot_has_one_panel_per_swept_key_and_one_line_per_other_setting(tmp_path):
    from train.sweep_plot import series

    sweep = tmp_path / "sweep"
    for i, (lr, blocks, style) in enumerate([("1e-4", "style", 0.5), ("3e-4", "style", 0.6), ("1e-4", "all", 0.3),
                                             ("3e-4", "all", 0.4)]):
        write_point(sweep, str(i), [f"optim.lr={lr}", f"blocks={blocks}"], [0.5] * 10, style=style, baseline=0.1)
    records = collect(sweep)
    assert series(records, "optim.lr", "style_similarity") == {
        "blocks=style": [("1e-4", 0.5), ("3e-4", 0.6)], "blocks=all": [("1e-4", 0.3), ("3e-4", 0.4)]}
    assert series(records, "blocks", "style_similarity")["optim.lr=3e-4"] == [("style", 0.6), ("all", 0.4)]
    png = tmp_path / "sweep.png"
    assert plot_sweep(records, "style_similarity", png)
    from PIL import Image

    assert Image.open(png).size == (1100, 400)  # two panels side by side
    assert not plot_sweep([dict(r, status="running") for r in records], "style_similarity", tmp_path / "none.png")


def test_points_are_numbered_as_hydras_sweeper_numbers_its_jobs():
    """Job N's folder is N: the order is the sweeper's (experiment params first, then the command line)."""
    points = expand_points(["optim.lr=1e-4,3e-4", "blocks=style,all", "trainer.max_steps=5"])
    assert points == [["optim.lr=0.0001", "blocks=style", "trainer.max_steps=5"],
                      ["optim.lr=0.0001", "blocks=all", "trainer.max_steps=5"],
                      ["optim.lr=0.0003", "blocks=style", "trainer.max_steps=5"],
                      ["optim.lr=0.0003", "blocks=all", "trainer.max_steps=5"]]
    assert expand_points(["data.shards=x.tar"], {"blocks": "style,all"}) == [["blocks=style", "data.shards=x.tar"],
                                                                            ["blocks=all", "data.shards=x.tar"]]


def test_slurm_plan_prints_each_job_with_nodes_gpus_and_command(capsys):
    sweep_main(["plan", "hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4",
                "hydra.launcher.partition=gpu", "hydra.sweep.dir=sweeps/lr", "data.shards=/data/x.tar",
                "optim.lr=1e-4,3e-4", "blocks=style,style_layout"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "4 job(s) through SlurmLauncher (partition=gpu timeout_min=1440 max_num_timeout=20 cpus_per_task=32)"
    assert out[1] == "sweep dir: sweeps/lr"
    assert out[2] == "job 0: 2 node(s) x 4 process(es) -> sweeps/lr/0"
    assert out[3] == (f"  each node runs: {REPO / 'launch.sh'} data.shards=/data/x.tar optim.lr=0.0001 blocks=style "
                      "output_dir=sweeps/lr/0 resume=auto")
    assert out[8] == "job 3: 2 node(s) x 4 process(es) -> sweeps/lr/3"
    sweep_main(["plan", "data.shards=/data/x.tar", "optim.lr=1e-4,3e-4"])  # the basic launcher: one process each
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "2 job(s) through BasicLauncher" and "give hydra.sweep.dir=DIR" in out[2]
    assert out[3].startswith("job 0: 1 node(s) x 1 process(es) -> multirun/")
    assert out[4].endswith("-m train data.shards=/data/x.tar optim.lr=0.0001 output_dir=" + out[3].split("-> ")[1]
                           + " resume=auto")


def test_a_submitted_multi_gpu_point_runs_launch_sh_with_its_gpus(monkeypatch):
    assert not runs_through_launch_sh(True, {"nodes": 1, "gpus_per_node": 1})
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert not runs_through_launch_sh(True, {"nodes": 2, "gpus_per_node": 8})  # not inside a submitted job
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    assert runs_through_launch_sh(True, {"nodes": 2, "gpus_per_node": 8})
    assert not runs_through_launch_sh(False, {"nodes": 2, "gpus_per_node": 8})  # launch.sh's own children
    monkeypatch.setenv("LAUNCH_DRY_RUN", "1")
    assert run_point_through_launch_sh(["optim.lr=1e-4"], "/tmp/sweep/0", {"nodes": 1, "gpus_per_node": 2}) == 0


def test_cluster_sweep_resumes_killed_points_and_never_retrains_finished_ones(tiny_model_dir, tmp_path):
    """submitit's local launcher runs the same code path as SLURM: kill the sweep, submit it again."""
    from data_tools.synthetic import write_synthetic_shards

    write_synthetic_shards(tmp_path / "shards", num=16, size=64, per_shard=8)
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "train", "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}",
            f"model.path={tiny_model_dir}", f"data.shards={tmp_path}/shards/*.tar", "data.resolution=64",
            "data.num_workers=0", "data.shuffle_buffer=8", "trainer.batch_size=1", "trainer.log_every=1",
            "trainer.checkpoint_every=3", "trainer.checkpoints_to_keep=1",
            "trainer.max_steps=2,100", "optim.lr=1e-4,3e-4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    # Jobs 0, 1 train 2 steps; jobs 2, 3 train 100 (the first override varies slowest). Kill once the short
    # ones are done and a long one has a checkpoint. The four run at once: when the short ones have exported,
    # the long ones are near step 20 and have already deleted checkpoint-00000003 (3 are kept), so any
    # checkpoint counts.
    short, long_points = [sweep / "0", sweep / "1"], [sweep / "2", sweep / "3"]
    done = lambda p: (p / "summary.json").exists()  # noqa: E731
    mid_run = lambda p: any((p / "checkpoints").glob("checkpoint-*")) and not done(p)  # noqa: E731
    deadline = time.monotonic() + 600
    while not (all(map(done, short)) and any(map(mid_run, long_points))):
        assert first.poll() is None, "the sweep ended before it could be killed"
        assert time.monotonic() < deadline, "no point got to its first checkpoint in time"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the launcher and every point it started
    first.wait()
    while time.monotonic() < deadline and any(r["status"] == "running" for r in collect(sweep)):
        time.sleep(0.2)  # the killed points exit (and drop their locks) a moment after the launcher
    killed = [p for p in long_points if (p / "checkpoints").is_dir() and not done(p)]
    assert killed and all(json.loads((p / "summary.json").read_text())["step"] == 2 for p in short)
    before = {p: (p / "ip-adapter.safetensors").stat().st_mtime_ns for p in short}
    assert [r["status"] for r in collect(sweep)][:2] == ["finished", "finished"]
    assert all(r["status"] == "stopped" for r in collect(sweep) if sweep / r["run"] in killed)

    again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: (p / "ip-adapter.safetensors").stat().st_mtime_ns for p in short} == before  # not retrained
    for p in short:
        assert "already done" in (p / "train_rank0.log").read_text()
    for p in long_points:
        assert json.loads((p / "summary.json").read_text())["step"] == 100
    for p in killed:
        log = (p / "train_rank0.log").read_text()
        assert "resum" in log.lower() and re.search(r"checkpoint-\d{8}", log), log[-2000:]
    assert [r["status"] for r in collect(sweep)] == ["finished"] * 4
