"""The GPU training path, checked on CPU: compile order and eager validation, cuDNN autotuning, foreach EMA,
asynchronous host-to-device copies."""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import train.sharding as sharding
import train.training as training
from train.compiling import choose_cudnn_benchmark, uncompiled, unet_blocks
from train.config import DataConfig, compose
from train.ema import EMA
from tests.helpers import tiny_overrides
from tests.test_train import fixed_batch, task  # noqa: F401 -- the task fixture
from tests.test_validation import styles, validation_args  # noqa: F401 -- the style references fixture

REPO = Path(__file__).resolve().parents[1]


def test_foreach_ema_equals_the_per_tensor_lerp_bitwise():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Conv2d(3, 4, 3))
    ema = EMA(module, 0.999)
    reference = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
    for _ in range(5):
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn_like(p))
        ema.update(module)
        for key, value in module.state_dict().items():  # the update as it was: one lerp per tensor
            reference[key].lerp_(value.float(), 1.0 - 0.999)
    assert all(torch.equal(ema.shadow[k], reference[k]) for k in reference)


def sharding_spy(monkeypatch) -> list[tuple[str, nn.Module]]:
    """Record fully_shard and Module.compile calls, in order, without a process group or a compiler."""
    events = []
    import torch.distributed.device_mesh as device_mesh
    import torch.distributed.fsdp as fsdp

    monkeypatch.setattr(device_mesh, "init_device_mesh", lambda *a, **k: None)
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **k: events.append(("shard", module)))
    monkeypatch.setattr(sharding.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(sharding.dist, "broadcast", lambda *a, **k: None)
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: events.append(("compile", self)))
    return events


def test_sharded_unet_is_compiled_block_by_block_after_it_is_sharded(monkeypatch, task):  # noqa: F811
    task, adapter = task
    base, events = task.base, sharding_spy(monkeypatch)
    accelerator = SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext, prepare=lambda o: o)
    optimizer = torch.optim.AdamW(adapter.parameters())
    training.prepare_model(base, adapter, optimizer, accelerator, shard=True, compile_unet=True)
    kinds = [kind for kind, _ in events]
    assert kinds == ["shard"] * kinds.count("shard") + ["compile"] * kinds.count("compile")
    blocks = unet_blocks(base.unet)
    assert [m for kind, m in events if kind == "compile"] == blocks  # not the whole UNet: hooks stay outside
    assert [m for kind, m in events if kind == "shard"] == [*blocks, base.unet]


def test_unsharded_unet_is_compiled_whole_after_prepare(monkeypatch, task):  # noqa: F811
    task, adapter = task
    events = sharding_spy(monkeypatch)
    accelerator = SimpleNamespace(prepare=lambda *objs: events.append(("prepare", None)) or objs)
    training.prepare_model(task.base, adapter, torch.optim.AdamW(adapter.parameters()), accelerator, shard=False,
                           compile_unet=True)
    assert events == [("prepare", None), ("compile", task.base.unet)]


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).relu()


def test_uncompiled_runs_eagerly_and_keeps_the_compiled_module_for_after():
    graphs = []

    def backend(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    module = TwoLayers()  # dynamo would skip torch.nn's own containers
    module.compile(backend=backend)
    x = torch.randn(2, 4)
    with uncompiled(module), torch.no_grad():
        eager = module(torch.randn(3, 4))
    assert graphs == [] and eager.shape == (3, 4)
    module(x)
    assert len(graphs) == 1


def test_fixed_batch_loss_and_validation_images_do_not_run_the_compiled_unet(monkeypatch, tiny_model_dir, shards,
                                                                            styles, tmp_path):  # noqa: F811
    grad_modes = []

    def fake_compile(fn, *args, **kwargs):
        def compiled(*a, **k):
            grad_modes.append(torch.is_grad_enabled())
            return fn(*a, **k)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    run = training.train(compose(tiny_overrides(tiny_model_dir, shards, tmp_path / "run", "trainer.max_steps=2",
                                                "trainer.checkpoint_every=0", "trainer.compile=true",
                                                "trainer.validate_every=1", *validation_args(styles, every=1))))
    assert run.step == 2 and run.summary["validation"]["step"] == 2
    assert grad_modes == [True, True]  # the two training steps; fixed-batch losses and images ran eagerly


@pytest.mark.parametrize("buckets, fixed", [("none", True), ("sdxl", False), ([[64, 64]], True),
                                            ([[64, 64], [128, 64]], False)])
def test_cudnn_autotuning_only_when_every_batch_has_one_shape(monkeypatch, buckets, fixed):
    saved = torch.backends.cudnn.benchmark
    try:
        assert training.fixed_shapes(DataConfig(shards="x", buckets=buckets)) is fixed
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert choose_cudnn_benchmark(fixed) is fixed and torch.backends.cudnn.benchmark is fixed
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert choose_cudnn_benchmark(True) is False and torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = saved


def ours(frame) -> bool:
    """Whether the caller of a spied function is this project's code."""
    caller = Path(frame.f_back.f_code.co_filename).resolve()
    return caller.is_relative_to(REPO) and caller.parts[len(REPO.parts)] in ("instantstyle", "train")


def test_live_encoding_makes_no_blocking_host_to_device_copy(monkeypatch, task):  # noqa: F811
    task, _ = task
    blocking = []
    to, tensor = torch.Tensor.to, torch.tensor

    def spied_to(self, *args, **kwargs):
        moves = any(isinstance(a, (torch.device, str)) for a in args) or "device" in kwargs
        if moves and not kwargs.get("non_blocking") and ours(inspect.currentframe()):
            blocking.append(inspect.currentframe().f_back.f_code.co_name)
        return to(self, *args, **kwargs)

    def spied_tensor(*args, **kwargs):
        if "device" in kwargs and ours(inspect.currentframe()):
            blocking.append(inspect.currentframe().f_back.f_code.co_name)
        return tensor(*args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spied_to)
    monkeypatch.setattr(torch, "tensor", spied_tensor)
    task.content_scale = 0.5  # the content subtraction's per-sample mask is on the path too
    task(fixed_batch())
    assert blocking == []
