"""Resolution stages: each starts from the previous stage's export, at a growing resolution with buckets."""

from __future__ import annotations

import pytest
import torch

from instantstyle.export import read_adapter_file
from tests.helpers import tiny_overrides
from train.config import ConfigError, compose
from train.checks import check_config

STAGES = ("stage_512", "stage_768", "stage_1024")


def test_each_stage_starts_from_the_previous_export(monkeypatch):
    monkeypatch.setenv("STAGES", "demo")
    cfgs = [compose([f"experiment={s}", "data.shards=x/*.tar"]) for s in STAGES]
    assert [c.data.resolution for c in cfgs] == [512, 768, 1024] and {c.data.buckets for c in cfgs} == {"sdxl"}
    assert cfgs[0].adapter.init_from is None
    for previous, stage in zip(cfgs, cfgs[1:]):
        assert stage.adapter.init_from == f"{previous.output_dir}/ip-adapter.safetensors"
    assert cfgs[0].output_dir == "stages/demo/stage_512" and cfgs[0].model.path == cfgs[2].model.path


def test_a_stage_before_its_predecessor_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "00000.tar").write_bytes(b"")  # the config check only needs the shard to exist
    with pytest.raises(ConfigError, match="stage_512/ip-adapter.safetensors: file not found"):
        check_config(compose(["experiment=stage_768", f"data.shards={tmp_path}/*.tar", "model=tiny"]))


def test_two_tiny_stages_chain_weights_not_optimizer(tiny_model_dir, shards, tmp_path):
    from train.training import train

    first = train(compose(tiny_overrides(tiny_model_dir, shards, tmp_path / "s1", "trainer.max_steps=2",
                                         "data.resolution=32", "optim.lr=1e-3")))
    export = tmp_path / "s1" / "ip-adapter.safetensors"
    second = train(compose(tiny_overrides(tiny_model_dir, shards, tmp_path / "s2", "trainer.max_steps=1",
                                          "optim.lr=1e-3", f"adapter.init_from={export}", "trainer.lr_scheduler=constant")))
    tensors, _ = read_adapter_file(export)
    proj = tensors["image_proj.proj.weight"]
    assert torch.equal(first.adapter.image_proj.proj.weight.detach(), proj)
    # Stage 2 took stage 1's weights (one step moves them only by about lr) with a fresh optimizer.
    assert (second.adapter.image_proj.proj.weight.detach() - proj).abs().max() <= 1.5e-3
    assert second.summary["step"] == 1 and not (tmp_path / "s2" / "checkpoints" / "checkpoint-00000002").exists()
    state = second.optimizer.state_dict()["state"]
    assert all(int(s["step"]) == 1 for s in state.values())  # Adam restarted: one step, not three
