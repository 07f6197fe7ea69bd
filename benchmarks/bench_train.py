"""Training-step benchmark: style-block adapter vs image branch everywhere vs the IP-Adapter tutorial.

    python -m benchmarks.bench_train [--steps 3] [--batch 2] [--device cpu|cuda]

Measures samples/s and peak memory of one UNet training step (frozen encoders cost the same
in every variant and are left out) on the tiny test UNet and on a mid-size SDXL-shaped UNet
with random weights, and counts training FLOPs per 1024² sample of the real SDXL UNet on the
``meta`` device. Variants:

- ``style``: our default, image branch in ``up_blocks.0.attentions.1`` only, frozen UNet.
- ``all``: image branch in all cross-attention layers, frozen UNet (what tutorial_train.py
  configures: it freezes the UNet and trains image_proj + every layer's to_k_ip/to_v_ip).
- ``tutorial+unet_grad``: ``all`` with UNet weights requiring grad (not stepped), i.e. a full
  backward with weight gradients everywhere: the upper bound of the tutorial's step cost.

A second table times the whole step with the frozen encoders: ``live`` runs the VAE, both text
encoders and the image encoder every step (scaled down with the mid-size UNet); ``cached`` reads
their outputs as ``data=cached`` does (latent mean/std sampled anew, encoders never loaded), and
its peak memory is the whole process's, encoders included. The FLOP table adds the encoders'
per-sample FLOPs of the real SDXL 1024² setup (VAE, CLIP-L, OpenCLIP bigG text and vision).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time

import psutil
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from instantstyle.adapter import AdapterSpec, install_adapter
from instantstyle.blocks import ALL_BLOCKS
from instantstyle.reference_configs import load_reference_config
from train.task import AdaptedUNet

VARIANTS = ("style", "all", "tutorial+unet_grad")
STYLE = ("up_blocks.0.attentions.1",)
H100_BF16_DENSE = 989e12  # FLOP/s


def mid_unet_config() -> dict:
    """The public SDXL UNet config at ~1/4 width and fewer transformer layers (fits a CPU)."""
    config = load_reference_config("sdxl_unet")
    config.update(block_out_channels=[128, 256, 512], transformer_layers_per_block=[1, 2, 4],
                  attention_head_dim=[2, 4, 8], cross_attention_dim=1024, addition_time_embed_dim=64,
                  projection_class_embeddings_input_dim=6 * 64 + 512, sample_size=32)
    return config


def tiny_unet_config() -> dict:
    from data_tools.make_tiny_model import build_tiny_unet

    return dict(build_tiny_unet().config)


def pooled_dim(config: dict) -> int:
    """Width of SDXL's pooled text embedding implied by the UNet's added-conditioning input."""
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


def build_variant(config: dict, variant: str, device: str | torch.device) -> tuple[AdaptedUNet, list]:
    """UNet + adapter for a variant; returns (model, parameters the optimizer steps)."""
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
    spec = AdapterSpec("ip_adapter", STYLE if variant == "style" else ALL_BLOCKS, pooled_dim(config), 4, 1280)
    adapter = install_adapter(unet, spec)
    if variant == "tutorial+unet_grad":
        unet.requires_grad_(True)  # weight grads for the whole UNet, as in a full backward
    return AdaptedUNet(unet, adapter), list(adapter.parameters())


def make_inputs(config: dict, batch: int, latent: int, device) -> tuple:
    """Random (latents, timesteps, prompt embeds, image features, added cond) of the UNet's shapes."""
    with torch.device(device):
        added = {"text_embeds": torch.randn(batch, pooled_dim(config)),
                 "time_ids": torch.tensor([[8.0 * latent, 8.0 * latent, 0, 0, 8.0 * latent, 8.0 * latent]] * batch)}
        return (torch.randn(batch, 4, latent, latent), torch.randint(0, 1000, (batch,)),
                torch.randn(batch, 77, config["cross_attention_dim"]), torch.randn(batch, pooled_dim(config)), added)


def train_step(model: AdaptedUNet, inputs: tuple, optimizer: torch.optim.Optimizer | None) -> None:
    """Forward, MSE against noise, backward, step."""
    latents = inputs[0]
    pred = model(*inputs)
    F.mse_loss(pred.float(), torch.randn_like(latents)).backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


class PeakRSS:
    """Polls this process's resident memory in a thread (CPU tensors bypass tracemalloc)."""

    def __enter__(self) -> "PeakRSS":
        self.proc, self.peak, self.running = psutil.Process(), 0, True
        self.base = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()


def measure(config: dict, variant: str, batch: int, latent: int, steps: int, device: str) -> dict:
    """samples/s over ``steps`` (after one warm-up) and peak memory above the loaded model and inputs.

    The peak includes the warm-up step: gradients, optimizer state and activations all count.
    """
    torch.manual_seed(0)
    model, params = build_variant(config, variant, device)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    inputs = make_inputs(config, batch, latent, device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        train_step(model, inputs, optimizer)  # warm-up: allocator, optimizer state
        start = time.perf_counter()
        for _ in range(steps):
            train_step(model, inputs, optimizer)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else rss.peak - rss.base
    return {"samples_per_s": steps * batch / elapsed, "peak_mb": peak / 2**20,
            "trainable_m": sum(p.numel() for p in params) / 1e6}


def _child(queue, fn, *args) -> None:
    torch.set_num_threads(torch.get_num_threads())
    queue.put(fn(*args))


def measure_isolated(*args, fn=None) -> dict:
    """``measure`` (or ``fn``) in a fresh process, so one variant's peak memory can't hide another's."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn or measure, *args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def training_flops(variant: str, resolution: int = 1024) -> float:
    """FLOPs of one training sample on the real SDXL UNet (forward + the backward autograd runs)."""
    config = load_reference_config("sdxl_unet")
    model, _ = build_variant(config, variant, "meta")
    inputs = make_inputs(config, 1, resolution // 8, "meta")
    with FlopCounterMode(display=False) as counter:
        train_step(model, inputs, None)
    return counter.get_total_flops()


def vae_encode_flops(resolution: int = 1024) -> float:
    """FLOPs of encoding one image with SDXL's VAE (frozen; the same for every variant)."""
    from instantstyle.reference_configs import build_vae

    vae = build_vae("sdxl_vae", "meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encode(torch.randn(1, 3, resolution, resolution, device="meta"))
    return counter.get_total_flops()


def speed_table(batch: int, steps: int, device: str) -> str:
    rows = ["| UNet | variant | trainable (M) | samples/s | × vs tutorial+unet_grad | × vs all | peak training memory above the model (MB) |",
            "|---|---|---|---|---|---|---|"]
    for name, config, latent in (("tiny (64 px)", tiny_unet_config(), 8), ("mid SDXL-shaped (256 px)", mid_unet_config(), 32)):
        results = {v: measure_isolated(config, v, batch, latent, steps, device) for v in VARIANTS}
        for v, r in results.items():
            vs_tut = r["samples_per_s"] / results["tutorial+unet_grad"]["samples_per_s"]
            vs_all = r["samples_per_s"] / results["all"]["samples_per_s"]
            rows.append(f"| {name} | {v} | {r['trainable_m']:.2f} | {r['samples_per_s']:.2f} | {vs_tut:.2f} | "
                        f"{vs_all:.2f} | {r['peak_mb']:.0f} |")
    return "\n".join(rows)


def flops_table() -> str:
    vae = vae_encode_flops()
    rows = ["| SDXL 1024² variant | UNet train TFLOP/sample | + VAE encode | samples/s at 50% H100 bf16 | × vs tutorial+unet_grad |",
            "|---|---|---|---|---|"]
    flops = {v: training_flops(v) for v in VARIANTS}
    for v, f in flops.items():
        total = f + vae
        rate = 0.5 * H100_BF16_DENSE / total
        rows.append(f"| {v} | {f / 1e12:.2f} | {total / 1e12:.2f} | {rate:.1f} | "
                    f"{(flops['tutorial+unet_grad'] + vae) / total:.2f} |")
    return "\n".join(rows)


def mid_encoders(device: str | torch.device) -> dict:
    """VAE, two text encoders and an image encoder scaled like ``mid_unet_config`` (random weights)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig
    from transformers import CLIPVisionModelWithProjection

    from instantstyle.reference_configs import build_vae

    vae_config = {**load_reference_config("sdxl_vae"), "block_out_channels": [32, 64, 128, 128]}
    text = dict(max_position_embeddings=77, vocab_size=49408)
    with torch.device(device):
        encoders = {
            "vae": type(build_vae("sdxl_vae", "meta")).from_config(vae_config),
            # hidden sizes 384 + 640 = the mid UNet's cross-attention width; projections = its pooled width
            "text_encoder": CLIPTextModel(CLIPTextConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                                         num_attention_heads=6, **text)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=640, intermediate_size=2560, num_hidden_layers=8, num_attention_heads=10,
                projection_dim=512, **text)),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=640, intermediate_size=2560, num_hidden_layers=8, num_attention_heads=10, image_size=224,
                patch_size=14, projection_dim=512)),
        }
    return {k: m.requires_grad_(False).eval() for k, m in encoders.items()}


@torch.no_grad()
def encode_live(encoders: dict, raw: dict) -> tuple:
    """(latent mean, std, prompt embeds, pooled, image embeds): what the cache stores, computed now."""
    dist = encoders["vae"].encode(raw["pixels"]).latent_dist
    out_1 = encoders["text_encoder"](raw["ids"], output_hidden_states=True)
    out_2 = encoders["text_encoder_2"](raw["ids"], output_hidden_states=True)
    prompt = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    return dist.mean, dist.std, prompt, out_2.text_embeds, encoders["image_encoder"](raw["clip_pixels"]).image_embeds


def measure_encoding(config: dict, encoding: str, batch: int, resolution: int, steps: int, device: str) -> dict:
    """samples/s of whole training steps (encode + UNet step) and the process's peak memory above its start."""
    from instantstyle.encode import sample_latents

    with PeakRSS() as rss:
        torch.manual_seed(0)
        model, params = build_variant(config, "style", device)
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        with torch.device(device):
            raw = {"pixels": torch.rand(batch, 3, resolution, resolution) * 2 - 1,
                   "ids": torch.randint(0, 49408, (batch, 77)), "clip_pixels": torch.randn(batch, 3, 224, 224)}
        encoders = mid_encoders(device) if encoding == "live" else None
        latent = resolution // 8
        with torch.device(device):  # what a cached batch holds (values do not change the cost)
            cache = (torch.randn(batch, 4, latent, latent), torch.rand(batch, 4, latent, latent),
                     torch.randn(batch, 77, config["cross_attention_dim"]), torch.randn(batch, pooled_dim(config)),
                     torch.randn(batch, pooled_dim(config)))
        generator = torch.Generator(device).manual_seed(0)

        def step() -> None:
            mean, std, prompt, pooled, image = encode_live(encoders, raw) if encoders else cache
            latents = sample_latents(mean, std, generator, 0.13025)
            time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, device=device)
            train_step(model, (latents, torch.randint(0, 1000, (batch,), device=device), prompt, image,
                               {"text_embeds": pooled, "time_ids": time_ids}), optimizer)

        step()  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            step()
        elapsed = time.perf_counter() - start
    return {"samples_per_s": steps * batch / elapsed, "peak_mb": (rss.peak - rss.base) / 2**20}


def encoding_table(batch: int, steps: int, device: str, resolution: int = 256) -> str:
    """Live vs cached whole-step speed and memory on the mid-size SDXL-shaped model."""
    rows = [f"| mid SDXL-shaped, {resolution} px, style blocks | samples/s | × vs live | peak process memory (MB) |",
            "|---|---|---|---|"]
    results = {e: measure_isolated(mid_unet_config(), e, batch, resolution, steps, device, fn=measure_encoding)
               for e in ("live", "cached")}
    for encoding, r in results.items():
        speedup = r["samples_per_s"] / results["live"]["samples_per_s"]
        rows.append(f"| {encoding} | {r['samples_per_s']:.2f} | {speedup:.2f} | {r['peak_mb']:.0f} |")
    return "\n".join(rows)


def encoder_flops(resolution: int = 1024) -> float:
    """FLOPs of the frozen encoders for one SDXL sample: VAE encode, CLIP-L + bigG text, bigG vision."""
    from instantstyle.reference_configs import build_image_encoder, build_text_encoder

    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        build_text_encoder("sdxl_text_encoder", "meta")(ids, output_hidden_states=True)
        build_text_encoder("sdxl_text_encoder_2", "meta")(ids, output_hidden_states=True)
        build_image_encoder("openclip_bigg_vision", "meta")(torch.randn(1, 3, 224, 224, device="meta"))
    return counter.get_total_flops() + vae_encode_flops(resolution)


def cache_flops_table() -> str:
    """Per-sample training TFLOP of SDXL at 1024²: live encoding vs the cache, style vs all blocks."""
    encoders = encoder_flops()
    rows = ["| SDXL 1024² | encoding | TFLOP/sample | samples/s at 50% H100 bf16 | × vs live |", "|---|---|---|---|---|"]
    for variant in ("style", "all"):
        unet = training_flops(variant)
        for encoding, total in (("live", unet + encoders), ("cached", unet)):
            rows.append(f"| {variant} | {encoding} | {total / 1e12:.2f} | {0.5 * H100_BF16_DENSE / total:.1f} | "
                        f"{(unet + encoders) / total:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-speed", action="store_true", help="only the FLOP counts")
    parser.add_argument("--encoding-resolution", type=int, default=256, help="image side of the live-vs-cached table")
    args = parser.parse_args(argv)
    print(f"device: {args.device}, torch threads: {torch.get_num_threads()}, batch {args.batch}, {args.steps} steps\n")
    if not args.skip_speed:
        print(speed_table(args.batch, args.steps, args.device) + "\n")
        print(encoding_table(args.batch, args.steps, args.device, args.encoding_resolution) + "\n")
    print(flops_table() + "\n")
    print(cache_flops_table())


if __name__ == "__main__":
    main()
