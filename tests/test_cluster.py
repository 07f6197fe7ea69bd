"""Cluster-grade training: preemption anywhere in 30 s, collective timeouts, precision, host syncs, speed flags."""

from __future__ import annotations

from collections import Counter

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import train.checkpoint as checkpoint
import train.loop as loop
import train.task as task_module
from train.config import TrainerConfig, choose_precision, compose, resolve_precision
from train.ema import EMA
from train.loggers import Trackers
from train.training import enable_tf32, load_base_once, make_accelerator, train
from tests.helpers import tiny_overrides
from tests.test_launch import free_port

REPO = Path(__file__).resolve().parents[1]
STATES = ("adapter", "optimizer", "lr_scheduler", "ema", "ranks")


def complete_files(folder: Path) -> bool:
    """Every state of a checkpoint is on disk and nothing is pending."""
    state = json.loads((folder / "trainer_state.json").read_text())
    return "pending" not in state and all((folder / f"{name}.json").is_file() for name in STATES)


# ---- precision, TF32, collective timeout, per-node base loading -------------------------------------------

def test_auto_precision_is_bf16_fp16_or_no_by_device(monkeypatch):
    assert TrainerConfig().mixed_precision == "auto"
    assert choose_precision("auto", cuda=True, bf16=True) == "bf16"
    assert choose_precision("auto", cuda=True, bf16=False) == "fp16"
    assert choose_precision("auto", cuda=False, bf16=False) == "no"
    assert choose_precision("fp16", cuda=False, bf16=False) == "fp16"  # an explicit choice stays
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, expected in [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 0), "fp16")]:  # H100, A100, V100
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, c=capability: c)
        assert resolve_precision(TrainerConfig()).mixed_precision == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision(TrainerConfig()).mixed_precision == "no"
    assert resolve_precision(TrainerConfig(mixed_precision="bf16")).mixed_precision == "bf16"


def test_tf32_is_enabled_on_cuda_unless_turned_off(monkeypatch):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert not enable_tf32(TrainerConfig()) and not torch.backends.cuda.matmul.allow_tf32
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert not enable_tf32(TrainerConfig(allow_tf32=False)) and not torch.backends.cudnn.allow_tf32
        assert enable_tf32(TrainerConfig())
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:  # process-wide switches: put them back for the other tests
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_collective_timeout_reaches_the_process_group(tmp_path):
    accelerator = make_accelerator(TrainerConfig(collective_timeout_s=1234), Trackers([], "p"), tmp_path)
    assert accelerator.init_handler.timeout == timedelta(seconds=1234)
    assert TrainerConfig().collective_timeout_s == 1800


def test_base_is_loaded_first_by_each_nodes_local_main_process():
    entered = []

    @contextmanager
    def first(who: str):
        entered.append(who)
        yield

    accelerator = SimpleNamespace(device="cpu", local_main_process_first=lambda: first("local"),
                                  main_process_first=lambda: first("global"))
    model = OmegaConf.create({"_target_": "builtins.dict"})  # returns the builder's arguments
    assert load_base_once(model, accelerator, torch.float16) == {"dtype": torch.float16, "device": "cpu", "encoders": True}
    assert entered == ["local"]


# ---- fp16 rules: skipped steps, VAE decode ----------------------------------------------------------------

@pytest.mark.parametrize("skipped", [True, False])
def test_skipped_fp16_step_moves_neither_schedule_nor_ema(skipped):
    module = torch.nn.Linear(2, 2)
    ema = EMA(module, 0.5)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    module(torch.ones(1, 2)).sum().backward()
    optimizer.step()  # when skipped, accelerate's optimizer.step() returned without touching the weights
    run = SimpleNamespace(accelerator=SimpleNamespace(optimizer_step_was_skipped=skipped), lr_scheduler=schedule,
                          ema=ema, adapter=module, step=0)
    before = ema.shadow["weight"].clone()
    assert loop.advance_after_step(run) is not skipped
    assert schedule.last_epoch == (0 if skipped else 1)
    assert torch.equal(ema.shadow["weight"], before) is skipped


def test_validation_decodes_outside_autocast_in_the_vaes_dtype(tiny_base):
    vae = tiny_base.vae
    latents = torch.randn(1, vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = vae.decode(latents).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert vae.decode(latents).sample.dtype == torch.bfloat16  # the bug: fp32 VAE run in half precision
            with loop.decoding_outside_autocast(vae):
                decoded = vae.decode(latents).sample
                from_half = vae.decode(latents.to(torch.bfloat16)).sample  # latents of a half-precision UNet
    assert decoded.dtype == from_half.dtype == torch.float32 and torch.equal(decoded, reference)
    assert "decode" not in vars(vae)  # the method is back


# ---- host syncs, stop checks, compile and channels_last ---------------------------------------------------

class SyncProbe(torch.Tensor):
    """A tensor that records the training step of every host sync made on it (or on tensors computed from it)."""

    step = [0]
    syncs: list[int] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.tolist, torch.Tensor.cpu,
                    torch.Tensor.numpy, torch.Tensor.__bool__):
            cls.syncs.append(cls.step[0])
        return super().__torch_function__(func, types, args, kwargs or {})


def test_loss_and_grad_norm_sync_only_on_log_steps_and_speed_flags_reach_the_unet(
        tiny_model_dir, shards, tmp_path, monkeypatch):
    from accelerate import Accelerator

    SyncProbe.syncs.clear()
    SyncProbe.step[0] = 0
    task_call, clip, step, agreed = task_module.DiffusionTask.__call__, Accelerator.clip_grad_norm_, loop.train_step, \
        loop.StopSignal.agreed
    votes, compiled = [], []

    def probed_task(self, batch):
        loss, metrics = task_call(self, batch)
        return loss.as_subclass(SyncProbe), metrics

    def counted_step(*args):
        SyncProbe.step[0] += 1
        return step(*args)

    monkeypatch.setattr(task_module.DiffusionTask, "__call__", probed_task)
    monkeypatch.setattr(Accelerator, "clip_grad_norm_", lambda *a, **k: clip(*a, **k).as_subclass(SyncProbe))
    monkeypatch.setattr(loop, "train_step", counted_step)
    monkeypatch.setattr(loop.StopSignal, "agreed",
                        lambda self, acc: votes.append(SyncProbe.step[0]) or agreed(self, acc))
    monkeypatch.setattr(torch, "compile", lambda fn, *a, **k: compiled.append(fn) or fn)  # never really compiles
    run = train(compose(tiny_overrides(tiny_model_dir, shards, tmp_path / "run", "trainer.max_steps=6",
                                       "trainer.log_every=3", "trainer.stop_check_every=4",
                                       "trainer.checkpoint_every=0", "trainer.compile=true",
                                       "trainer.channels_last=true")))
    assert run.step == 6 and run.summary["final_loss"] > 0
    per_step = Counter(SyncProbe.syncs)
    # One host sync per step, the inf/NaN skip decision (a bool); the loss and grad norm are read on log steps only.
    assert [per_step[s] for s in (1, 2, 4, 5)] == [1, 1, 1, 1] and per_step[3] > 1 and per_step[6] > 1
    assert votes == [4, 6, 6]  # every stop_check_every steps, and before and after the last checkpoint
    unet = run.base.unet
    assert [getattr(fn, "__self__", None) for fn in compiled] == [unet]
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


# ---- preemption in one process ----------------------------------------------------------------------------

RUN_ARGS = ("trainer.max_steps=4", "trainer.checkpoint_every=0", "trainer.ema=0.9", "trainer.lr_scheduler=cosine",
            "trainer.record_sample_keys=true", "optim.lr=1e-3", "data.drop_image_prob=0.3")


@pytest.fixture(scope="module")
def styles(tmp_path_factory) -> list[str]:
    """Validation overrides: two synthetic styles, two prompts, 20 denoising steps (many UNet calls to stop in)."""
    from data_tools.synthetic import render, sample_attributes

    folder = tmp_path_factory.mktemp("styles")
    rng = __import__("numpy").random.default_rng(0)
    for i in range(2):
        render(sample_attributes(rng), 64).save(folder / f"style{i}.png")
    return [f"validation.styles={folder}", "validation.prompts=[a circle,a square]", "validation.every=2",
            "validation.steps=20", "validation.height=64", "validation.width=64"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir, shards, tmp_path_factory):
    """Four steps in one go, no validation (validation never changes training)."""
    out = tmp_path_factory.mktemp("reference")
    return out, train(compose(tiny_overrides(tiny_model_dir, shards, out, *RUN_ARGS)))


def test_signal_during_validation_stops_it_and_resumes_bitwise(reference, styles, tiny_model_dir, shards, tmp_path,
                                                               monkeypatch):
    ref_dir, ref = reference
    out = tmp_path / "run"
    cfg = compose(tiny_overrides(tiny_model_dir, shards, out, *RUN_ARGS, *styles))
    unet_calls, evaluate = [], loop.evaluate_live

    def signalled_evaluation(run, refs, out_dir):
        hook = run.base.unet.register_forward_pre_hook(lambda *a: unet_calls.append(1))
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets the flag; the next UNet call sees it
        try:
            return evaluate(run, refs, out_dir)
        finally:  # only the validation's UNet calls count (the checkpoint's weight probe runs the UNet too)
            hook.remove()

    monkeypatch.setattr(loop, "evaluate_live", signalled_evaluation)
    first = train(cfg)
    monkeypatch.undo()
    assert first.summary["preempted"] and first.step == 2 and unet_calls == []  # stopped before the first UNet call
    assert not (out / "eval" / "step-00000002" / "metrics.json").exists()  # cut short, no report
    assert complete_files(out / "checkpoints" / "checkpoint-00000002")
    second = train(cfg)
    assert second.summary["resumed_from"].endswith("checkpoint-00000002") and second.step == 4
    assert all(torch.equal(v, second.adapter.state_dict()[k]) for k, v in ref.adapter.state_dict().items())
    ref_opt = load_file(str(ref_dir / "checkpoints/checkpoint-00000004/optimizer.safetensors"))
    new_opt = load_file(str(out / "checkpoints/checkpoint-00000004/optimizer.safetensors"))
    assert all(torch.equal(ref_opt[k], new_opt[k]) for k in ref_opt)


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs."""


def test_preemption_checkpoint_is_usable_before_optimizer_and_ema_are_written(reference, tiny_model_dir, shards,
                                                                              tmp_path, monkeypatch):
    ref_dir, _ref = reference
    out = tmp_path / "run"
    cfg = compose(tiny_overrides(tiny_model_dir, shards, out, *RUN_ARGS, "trainer.stop_check_every=1"))
    written, write = [], checkpoint._write_encoded

    def killed_at_optimizer(folder, name, tree, tensors):
        written.append(name)
        if name == "optimizer":
            raise Killed
        write(folder, name, tree, tensors)

    monkeypatch.setattr(loop.StopSignal, "agreed", lambda self, acc: True)  # signalled in step 1
    monkeypatch.setattr(checkpoint, "_write_encoded", killed_at_optimizer)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.undo()
    assert written == ["adapter", "lr_scheduler", "ranks", "optimizer"]  # the essentials first
    folder = out / "checkpoints" / "checkpoint-00000001"
    assert json.loads((folder / "trainer_state.json").read_text())["pending"] == ["optimizer", "ema"]
    resumed = train(cfg)  # resume=auto finds it: optimizer and EMA start afresh, data and RNG continue
    assert resumed.summary["resumed_from"].endswith("checkpoint-00000001") and resumed.step == 4
    assert (out / "sample_keys/rank0.txt").read_text() == (ref_dir / "sample_keys/rank0.txt").read_text()
    assert complete_files(out / "checkpoints" / "checkpoint-00000004")


# ---- preemption across two processes ----------------------------------------------------------------------

# Each rank runs train(); rank 0 signals rank 1 (and in "checkpoint" mode itself) at the chosen moment.
RANK_SCRIPT = '''
import json, os, signal, sys
from pathlib import Path
from safetensors.torch import save_file
import train.checkpoint as checkpoint, train.loop as loop
from train.config import compose
from train.training import train
out, mode = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ["RANK"])
(out / f"pid{rank}").write_text(str(os.getpid()))
saves = []
def signal_ranks(*own):
    os.kill(int((out / "pid1").read_text()), signal.SIGTERM)
    for pid in own:
        os.kill(pid, signal.SIGTERM)
if rank == 0 and mode == "validation":  # rank 1 is signalled while rank 0 generates alone
    evaluate = loop.evaluate_live
    loop.evaluate_live = lambda *a: signal_ranks() or evaluate(*a)
if rank == 0 and mode == "checkpoint":  # both ranks are signalled in the middle of a checkpoint write
    write = checkpoint._write_encoded
    def signalled_write(folder, name, tree, tensors):
        if name == "optimizer" and name not in saves:
            signal_ranks(os.getpid())
        saves.append(name)
        write(folder, name, tree, tensors)
    checkpoint._write_encoded = signalled_write
import train.training as training
export, live = training.export_final, {}
def export_after_copy(run):  # the export puts EMA weights into rank 0's adapter; keep the live ones
    live.update({k: v.detach().clone().contiguous() for k, v in run.adapter.state_dict().items()})
    return export(run)
training.export_final = export_after_copy
run = train(compose(sys.argv[3:]))
weight = run.base.unet.conv_in.weight  # a DTensor holding this rank's shard when the UNet is sharded
local = weight.to_local() if hasattr(weight, "to_local") else weight
(out / f"summary{rank}.json").write_text(json.dumps({**run.summary, "writes": saves,
                                                    "unet_shard": [local.shape[0], weight.shape[0]]}))
weights = live or {k: v.contiguous() for k, v in run.adapter.state_dict().items()}
save_file(weights, str(out / f"adapter{rank}.safetensors"))
'''


def launch_two(tmp_path: Path, mode: str, overrides: list[str], **extra_env: str) -> dict:
    """Train in two gloo processes; rank 0's summary (with the names of the states it wrote)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "ACCELERATE_USE_CPU": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra_env}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(tmp_path / "ranks.py"), str(tmp_path), mode, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads((tmp_path / f"summary{r}.json").read_text()) for r in (0, 1)]
    assert summaries[0]["step"] == summaries[1]["step"]
    assert summaries[0]["preempted"] == summaries[1]["preempted"]  # the ranks agreed
    adapters = [load_file(str(tmp_path / f"adapter{r}.safetensors")) for r in (0, 1)]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])  # replicas stay identical
    return summaries[0]


@pytest.mark.skipif(os.environ.get("SKIP_MULTIPROCESS") == "1", reason="SKIP_MULTIPROCESS=1")
def test_two_ranks_agree_to_stop_in_validation_and_in_a_checkpoint_write(styles, tiny_model_dir, shards, tmp_path):
    (tmp_path / "ranks.py").write_text(RANK_SCRIPT)
    out = tmp_path / "run"
    args = tiny_overrides(tiny_model_dir, shards, out, "trainer.max_steps=4", "trainer.ema=0.9", "optim.lr=1e-3",
                          "trainer.checkpoint_every=3", *styles)
    # 1. Rank 1 is signalled while rank 0 validates step 2 (no checkpoint due): both stop, a checkpoint is written.
    first = launch_two(tmp_path, "validation", args)
    assert first["preempted"] and first["step"] == 2
    assert not (out / "eval" / "step-00000002" / "metrics.json").exists()
    assert complete_files(out / "checkpoints" / "checkpoint-00000002")
    # 2. Resumed; both ranks are signalled while the step-3 checkpoint is being written: it completes, once.
    second = launch_two(tmp_path, "checkpoint", args)
    assert second["resumed_from"].endswith("checkpoint-00000002") and second["preempted"] and second["step"] == 3
    assert second["writes"] == ["adapter", "optimizer", "lr_scheduler", "ema", "ranks"]
    assert complete_files(out / "checkpoints" / "checkpoint-00000003")
    # 3. Resumed to the end, validated, exported.
    third = launch_two(tmp_path, "none", args)
    assert third["resumed_from"].endswith("checkpoint-00000003") and third["step"] == 4 and not third["preempted"]
    assert (out / "eval" / "step-00000004" / "metrics.json").is_file() and (out / "ip-adapter.safetensors").is_file()


# ---- FSDP: the frozen UNet sharded, the adapter replicated ------------------------------------------------

@pytest.mark.parametrize("fsdp, backend, processes, shard", [
    ("true", "FSDP", 2, True), ("True", "FSDP", 2, True), ("true", "FSDP", 1, False), ("false", None, 2, False)])
def test_fsdp_config_shards_on_several_processes_and_ddp_does_not(monkeypatch, fsdp, backend, processes, shard):
    from train.sharding import take_over_sharding
    from train.training import check_distributed

    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", fsdp)  # "true" is what `accelerate launch` sets for fsdp.yaml
    assert take_over_sharding() == backend
    assert os.environ["ACCELERATE_USE_FSDP"] == "false"  # Accelerate itself runs data parallel
    assert check_distributed(backend, processes) is shard


def test_a_deepspeed_config_is_refused_in_one_line(monkeypatch):
    from train.config import ConfigError
    from train.sharding import take_over_sharding

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    with pytest.raises(ConfigError, match="^DeepSpeed configs are not supported: .* use ACCELERATE_CONFIG=fsdp"):
        take_over_sharding()


@pytest.mark.skipif(os.environ.get("SKIP_MULTIPROCESS") == "1", reason="SKIP_MULTIPROCESS=1")
def test_fsdp_shards_the_frozen_unet_and_resumes_bitwise_equal_to_ddp(styles, tiny_model_dir, shards, tmp_path):
    (tmp_path / "ranks.py").write_text(RANK_SCRIPT)
    validation = [a for a in styles if not a.startswith("validation.steps")] + ["validation.steps=2"]

    def args(out: Path, steps: int) -> list[str]:
        return tiny_overrides(tiny_model_dir, shards, out, f"trainer.max_steps={steps}", "trainer.ema=0.9",
                              "optim.lr=1e-3", "trainer.checkpoint_every=2", "trainer.validate_every=2", *validation)

    ddp = launch_two(tmp_path, "none", args(tmp_path / "ddp", 4))
    assert ddp["unet_shard"][0] == ddp["unet_shard"][1]  # DDP: every rank holds the whole UNet
    fsdp = tmp_path / "fsdp"
    # What `accelerate launch --config_file configs/accelerate/fsdp.yaml` sets; on CPU Accelerate would ignore it.
    first = launch_two(tmp_path, "none", args(fsdp, 2), ACCELERATE_USE_FSDP="true")
    local, full = first["unet_shard"]
    assert local * 2 == full  # each rank holds half of the frozen UNet
    resumed = launch_two(tmp_path, "none", args(fsdp, 4), ACCELERATE_USE_FSDP="true")
    assert resumed["resumed_from"].endswith("checkpoint-00000002") and resumed["step"] == 4
    assert (fsdp / "eval" / "step-00000004" / "metrics.json").is_file()  # validation ran on both ranks together
    for name in ("adapter", "optimizer", "ema"):
        ref = load_file(str(tmp_path / "ddp" / f"checkpoints/checkpoint-00000004/{name}.safetensors"))
        new = load_file(str(fsdp / f"checkpoints/checkpoint-00000004/{name}.safetensors"))
        assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref), name
    ref = load_file(str(tmp_path / "ddp" / "ip-adapter.safetensors"))  # untrained layers come from the whole UNet
    new = load_file(str(fsdp / "ip-adapter.safetensors"))
    assert ref.keys() == new.keys() and all(torch.equal(ref[k], new[k]) for k in ref)
