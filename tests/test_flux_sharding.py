"""FSDP2 with model=flux: the frozen transformer sharded per double/single block over 2 CPU processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cluster import launch_two

from tests.helpers import tiny_overrides

# Each rank trains, then writes its summary, the size of its shard of a transformer weight and its adapter.
RANK_SCRIPT = '''
import json, os, sys
from pathlib import Path
from safetensors.torch import save_file
from train.config import compose
from train.training import train
out, rank = Path(sys.argv[1]), int(os.environ["RANK"])
run = train(compose(sys.argv[3:]))
block = run.base.transformer.single_transformer_blocks[0].proj_out.weight  # a DTensor shard when sharded
local = block.to_local() if hasattr(block, "to_local") else block
(out / f"summary{rank}.json").write_text(json.dumps({**run.summary, "shard": [local.shape[0], block.shape[0]]}))
save_file({k: v.contiguous() for k, v in run.adapter.state_dict().items()}, str(out / f"adapter{rank}.safetensors"))
'''


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    from data_tools.make_tiny_flux import save_tiny_flux

    return str(save_tiny_flux(tmp_path_factory.mktemp("sharded_flux") / "base", seed=0))


@pytest.mark.skipif(os.environ.get("SKIP_MULTIPROCESS") == "1", reason="SKIP_MULTIPROCESS=1")
def test_fsdp_shards_the_flux_transformer_and_resumes_bitwise_equal_to_ddp(flux_dir, shards, tmp_path):
    (tmp_path / "ranks.py").write_text(RANK_SCRIPT)

    def args(out: Path, steps: int) -> list[str]:
        return tiny_overrides(flux_dir, shards, out, "model=flux", "model.image_encoder=null", "blocks=all",
                              f"trainer.max_steps={steps}", "trainer.checkpoint_every=2", "optim.lr=1e-3",
                              "trainer.gradient_checkpointing=true")

    ddp = launch_two(tmp_path, "none", args(tmp_path / "ddp", 4))
    assert ddp["shard"][0] == ddp["shard"][1]  # DDP: every rank holds the whole transformer
    fsdp = tmp_path / "fsdp"
    first = launch_two(tmp_path, "none", args(fsdp, 2), ACCELERATE_USE_FSDP="true")  # stops after step 2
    local, full = first["shard"]
    assert local * 2 == full  # each rank holds half of every frozen block
    resumed = launch_two(tmp_path, "none", args(fsdp, 4), ACCELERATE_USE_FSDP="true")
    assert resumed["resumed_from"].endswith("checkpoint-00000002") and resumed["step"] == 4
    for name in ("adapter", "optimizer"):
        ref = load_file(str(tmp_path / "ddp" / f"checkpoints/checkpoint-00000004/{name}.safetensors"))
        new = load_file(str(fsdp / f"checkpoints/checkpoint-00000004/{name}.safetensors"))
        assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref), name
    ref, new = load_file(str(tmp_path / "ddp" / "ip-adapter.safetensors")), load_file(str(fsdp / "ip-adapter.safetensors"))
    assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)


def test_a_sharded_flux_transformer_compiles_block_by_block():
    from data_tools.make_tiny_flux import build_tiny_flux_transformer
    from train.compiling import compile_denoiser

    transformer = build_tiny_flux_transformer()
    compile_denoiser(transformer, sharded=True)  # trainer.compile with ACCELERATE_CONFIG=fsdp
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert all(block._compiled_call_impl is not None for block in blocks)
    assert transformer._compiled_call_impl is None  # FSDP's hooks stay between the compiled blocks
