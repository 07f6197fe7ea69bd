"""The memory plan: weight sizes from the public configs, activations checked against measured CPU peaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instantstyle.model_sizes import QUANTIZED_BYTES, meta_base, weight_bytes
from instantstyle.plan_memory import GIB, QUANTIZE, PlanOptions, main, plan_memory

REPO = Path(__file__).resolve().parents[1]
# The estimate must be within this factor of the measured peak (both ways).
FACTOR = 1.6

# Runs in a fresh process: the plan's own training forward, for real on the CPU, after one warm-up step.
# Allocations above 64 KiB are mmapped, so freed memory leaves the process and VmHWM (reset through
# /proc/self/clear_refs) is the peak of what the step allocated.
MEASURE = """
import json, re, sys, torch
from instantstyle.model_sizes import install_meta_adapter, meta_base
from instantstyle.plan_memory import PlanOptions, plan_memory, training_forward

def rss(field):
    return int(re.search(rf"{field}:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

folder, res, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
torch.set_num_threads(1)
results = []
for checkpointing in (False, True):
    options = PlanOptions("all", batch, res, gradient_checkpointing=checkpointing, dtype="fp32")
    planned = plan_memory(meta_base(folder), options).training_step
    base = meta_base(folder)
    sub = "transformer" if base.family == "flux" else "unet"
    base.denoiser = type(base.denoiser).from_pretrained(folder, subfolder=sub).requires_grad_(False)
    if checkpointing:
        base.denoiser.enable_gradient_checkpointing()
    adapter = install_meta_adapter(base, "all")
    training_forward(base, adapter, options, "cpu").backward()  # warm-up: lazy kernels, thread pools
    before = rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    training_forward(base, adapter, options, "cpu").backward()
    results.append({"checkpointing": checkpointing, "planned": planned, "measured": rss("VmHWM") - before})
    print(results[-1], file=sys.stderr)
from diffusers import AutoencoderKL
vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
pixels = torch.randn(batch, 3, res, res)
with torch.no_grad():
    vae.encode(pixels).latent_dist.sample()
    before = rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    vae.encode(pixels).latent_dist.sample()
planned = plan_memory(meta_base(folder), PlanOptions("all", batch, res, dtype="fp32")).encoding
results.append({"encoders": True, "planned": planned, "measured": rss("VmHWM") - before})
print(json.dumps(results))
"""


def measured_and_planned(folder: str, resolution: int, batch: int) -> list[dict]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", MEASURE, folder, str(resolution), str(batch)], env=env,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


needs_proc = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak reset")


@pytest.fixture(scope="module")
def tiny_flux_dir(tmp_path_factory) -> str:
    from data_tools.make_tiny_flux import save_tiny_flux

    return str(save_tiny_flux(tmp_path_factory.mktemp("plan_flux") / "base", seed=0))


def assert_within_factor(rows: list[dict]) -> None:
    for row in rows:
        ratio = row["planned"] / row["measured"]
        assert 1 / FACTOR <= ratio <= FACTOR, row


@needs_proc
def test_plan_of_tiny_flux_training_step_matches_measured_cpu_peak(tiny_flux_dir):
    assert_within_factor(measured_and_planned(tiny_flux_dir, 256, 8))


@needs_proc
def test_plan_of_tiny_sdxl_training_step_matches_measured_cpu_peak(tiny_model_dir):
    assert_within_factor(measured_and_planned(tiny_model_dir, 256, 2))


def test_flux1_dev_weights_come_from_the_public_configs():
    base = meta_base("flux")
    plan = plan_memory(base, PlanOptions("double_blocks.18", batch=1, resolution=256))
    assert plan.resident["frozen transformer"] / GIB == pytest.approx(22.17, abs=0.005)
    assert plan.resident["frozen text_encoder_2 (T5)"] / GIB == pytest.approx(8.87, abs=0.005)
    branch = 2 * (4096 * 3072 + 3072)  # to_k_ip + to_v_ip: T5 width 4096 -> 24 heads x 128
    projection = 768 * 4 * 4096 + 4 * 4096 + 2 * 4096  # CLIP ViT-L/14 768 -> 4 tokens, LayerNorm
    assert plan.trainable_params == branch + projection
    assert plan.resident["adapter (weights, grads, optimizer)"] == 16 * plan.trainable_params


def test_quantizing_shrinks_only_linear_weights_by_their_byte_ratio():
    assert QUANTIZE == ("none", *QUANTIZED_BYTES)
    unet = meta_base("sdxl").denoiser
    linear = sum(m.weight.numel() for m in unet.modules() if isinstance(m, torch.nn.Linear))
    kept = sum(m.weight.numel() for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v")))
    bf16 = weight_bytes(unet, 2)
    assert bf16 - weight_bytes(unet, 2, "int8") == (linear - kept) * 1
    assert bf16 - weight_bytes(unet, 2, "nf4") == pytest.approx((linear - kept) * (2 - 0.5 - 1 / 64))


def test_each_memory_option_shrinks_the_part_it_is_for(tiny_flux_dir):
    base = meta_base(tiny_flux_dir)
    plain = plan_memory(base, PlanOptions("all", batch=2, resolution=256))

    def planned(**option):
        return plan_memory(base, PlanOptions("all", batch=2, resolution=256, **option))

    nf4, sharded, cached = planned(quantize="nf4"), planned(shard_gpus=4), planned(cached=True)
    assert nf4.resident["frozen transformer"] < plain.resident["frozen transformer"]
    assert nf4.resident["frozen text_encoder_2 (T5)"] < plain.resident["frozen text_encoder_2 (T5)"]
    assert sharded.resident["frozen transformer"] < plain.resident["frozen transformer"]
    assert cached.encoding == 0 and not any("encoder" in part for part in cached.resident)
    assert planned(gradient_checkpointing=True).training_step < plain.training_step / 2
    assert (planned(adam8bit=True).resident["adapter (weights, grads, optimizer)"]
            == plain.resident["adapter (weights, grads, optimizer)"] * 10 / 16)
    assert all(p.peak < plain.peak for p in (nf4, sharded, cached))


def test_command_prints_the_peak_and_the_verdict_per_card(capsys):
    main(["--base", "sdxl", "--blocks", "style", "--batch", "1", "--resolution", "512"])
    out = capsys.readouterr().out
    assert "peak per GPU" in out and "fits: 24 GB yes   48 GB yes   80 GB yes" in out


@pytest.mark.parametrize("argv", [["--base", "nowhere"], ["--base", "flux", "--blocks", "style"],
                                  ["--base", "sdxl", "--batch", "0"]])
def test_bad_input_is_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error: ") and "\n" not in err
