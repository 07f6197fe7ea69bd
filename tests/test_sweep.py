"""Hydra multirun puts each run in its own folder; train.sweep turns the folder into one table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from instantstyle.export import read_adapter_file
from train.sweep import collect, main as sweep_main, markdown_table

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
    table = capsys.readouterr().out
    assert table == (tmp_path / "sweep.md").read_text() == markdown_table(records)
    lines = table.splitlines()
    assert lines[2] == "| run | overrides | steps | final loss | samples/s | style_similarity | text_alignment |"
    loss = records[0]["summary"]["final_loss"]
    assert lines[4].startswith(f"| 0 | blocks=style | 2/2 | {loss:.4f} |") and lines[4].endswith("| – | – |")
    assert lines[5].startswith("| 1 | blocks=layout | 2/2 |") and lines[5].endswith("| 0.5000 | 0.2500 |")
    assert "trainer.max_steps=2" in lines[0]  # shared overrides listed once
