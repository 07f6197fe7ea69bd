"""GPU training-step benchmark of the real-size SDXL adapter variants (random weights, no download).

    python -m benchmarks.bench_gpu [--batch 8 --resolution 1024 --warmup 2 --steps 5 --no-compile]
    python -m benchmarks.bench_gpu --dry-run     # the same code path on CPU with the tiny models

Builds the SDXL UNet, VAE, both text encoders and the OpenCLIP bigG image encoder from the configs
in ``instantstyle/configs`` and measures, per variant of ``benchmarks.bench_train``, samples/s, peak memory
and model FLOP utilisation (FLOPs per sample counted on the ``meta`` device). ``live`` encoding runs
the frozen encoders every step; ``cached`` reuses their outputs, computed once before timing, i.e. the
UNet step alone, as when training from precomputed latents and embeddings (encoders not in memory).
Precision follows the trainer: bf16 autocast, TF32 on, frozen networks in bf16, adapter fp32;
``tutorial+unet_grad`` keeps the UNet fp32 under autocast, as IP-Adapter's tutorial_train.py does.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

from instantstyle.content import encode_image
from instantstyle.reference_configs import build_image_encoder, build_text_encoder, build_vae, load_reference_config
from benchmarks.bench_train import VARIANTS, PeakRSS, build_variant, tiny_unet_config
from train.task import AdaptedUNet

ENCODINGS = ("live", "cached")
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets; the first name contained wins.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}
FIRST_COMPILE_GUESS_S = 150.0  # SDXL forward+backward under inductor, before one has been timed


@dataclass
class Encoders:
    """The frozen networks of SDXL adapter training."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    image_encoder: CLIPVisionModelWithProjection

    def frozen(self, dtype: torch.dtype) -> Encoders:
        """Eval mode, no grads, ``dtype`` weights (as the trainer loads them)."""
        for module in (self.vae, self.text_encoder, self.text_encoder_2, self.image_encoder):
            module.requires_grad_(False).eval().to(dtype)
        return self


def sdxl_encoders(device: str | torch.device) -> Encoders:
    """Full-size random-weight SDXL encoders from the committed public configs."""
    return Encoders(build_vae("sdxl_vae", device), build_text_encoder("sdxl_text_encoder", device),
                    build_text_encoder("sdxl_text_encoder_2", device),
                    build_image_encoder("openclip_bigg_vision", device))


def tiny_encoders(device: str | torch.device) -> Encoders:
    """The tiny test model's encoders (built on CPU, then moved: its scheduler can't live on meta)."""
    from data_tools.make_tiny_model import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    return Encoders(*(m.to(device) for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.image_encoder)))


@dataclass(frozen=True)
class Setup:
    """What every row shares: models, shapes, precision, device and step counts."""

    unet_config: dict
    build_encoders: Callable[[str | torch.device], Encoders]
    device: str  # "cuda", "cpu" or "meta"
    batch: int
    resolution: int
    amp: bool  # bf16 autocast with bf16 frozen weights; False = everything fp32
    warmup: int
    steps: int
    gradient_checkpointing: bool = False

    @property
    def autocast(self) -> torch.autocast:
        # meta (FLOP counting) has no autocast; it runs with amp off
        return torch.autocast("cuda" if self.device == "cuda" else "cpu", torch.bfloat16, enabled=self.amp)


@dataclass
class Row:
    """One line of the table; ``note`` replaces the measurements when there are none."""

    variant: str
    encoding: str
    compiled: bool
    tflop_per_sample: float
    samples_per_s: float | None = None
    peak_gib: float | None = None
    note: str = ""


def build_model(setup: Setup, variant: str, device: str | torch.device) -> tuple[AdaptedUNet, list[nn.Parameter]]:
    """The variant's adapted UNet in the trainer's precision; returns (model, adapter parameters)."""
    model, params = build_variant(setup.unet_config, variant, device)
    if setup.amp and variant != "tutorial+unet_grad":
        model.unet.to(torch.bfloat16)  # frozen weight dtype; this also casts the branches living in it...
        model.adapter.float()  # ...which train in fp32
    if setup.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    return model, params


def raw_inputs(setup: Setup, encoders: Encoders) -> dict[str, torch.Tensor]:
    """Random pixels, token ids, timesteps and SDXL time ids for one batch."""
    b, r, dtype = setup.batch, setup.resolution, encoders.vae.dtype
    clip, tokens = encoders.image_encoder.config.image_size, encoders.text_encoder.config.max_position_embeddings
    with torch.device(setup.device):
        return {"pixels": torch.randn(b, 3, r, r, dtype=dtype),
                "ids": torch.randint(0, encoders.text_encoder.config.vocab_size, (b, tokens)),
                "ids_2": torch.randint(0, encoders.text_encoder_2.config.vocab_size, (b, tokens)),
                "clip_pixels": torch.randn(b, 3, clip, clip, dtype=dtype),
                "timesteps": torch.randint(0, 1000, (b,)),
                "time_ids": torch.tensor([[r, r, 0, 0, r, r]] * b, dtype=dtype)}


@torch.no_grad()
def encode_live(encoders: Encoders, raw: dict[str, torch.Tensor]) -> tuple:
    """The UNet's inputs from the frozen encoders, as ``DiffusionTask.encode`` computes them."""
    vae = encoders.vae
    latents = vae.encode(raw["pixels"]).latent_dist.sample() * vae.config.scaling_factor
    out_1 = encoders.text_encoder(raw["ids"], output_hidden_states=True)
    out_2 = encoders.text_encoder_2(raw["ids_2"], output_hidden_states=True)
    prompt_embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    features = encode_image(encoders.image_encoder, raw["clip_pixels"])
    added = {"text_embeds": out_2.text_embeds, "time_ids": raw["time_ids"]}
    return latents.float(), raw["timesteps"], prompt_embeds, features, added


def train_step(setup: Setup, model: AdaptedUNet, optimizer: torch.optim.Optimizer | None,
               make_inputs: Callable[[], tuple]) -> None:
    """Inputs, forward under autocast, MSE against noise, backward (outside autocast), step."""
    with setup.autocast:
        inputs = make_inputs()
        pred = model(*inputs)
    F.mse_loss(pred.float(), torch.randn_like(inputs[0])).backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def count_flops(setup: Setup) -> dict[str, float]:
    """Training FLOPs of one sample on ``meta``: the encoders (key 'encoders') and each variant's UNet step."""
    # model FLOPs: what gradient checkpointing recomputes is not counted
    meta = replace(setup, device="meta", batch=1, amp=False, gradient_checkpointing=False)
    encoders = setup.build_encoders("meta")
    raw = raw_inputs(meta, encoders)
    with FlopCounterMode(display=False) as counter:
        inputs = encode_live(encoders, raw)
    flops = {"encoders": counter.get_total_flops()}
    for variant in VARIANTS:
        model, _ = build_model(meta, variant, "meta")
        with FlopCounterMode(display=False) as counter:
            train_step(meta, model, None, lambda: inputs)
        flops[variant] = counter.get_total_flops()
    return flops


def tflop_per_sample(flops: dict[str, float], variant: str, encoding: str) -> float:
    """The UNet step's FLOPs, plus the frozen encoders' when they run every step."""
    return (flops[variant] + (flops["encoders"] if encoding == "live" else 0.0)) / 1e12


def free_memory(setup: Setup) -> None:
    """Drop what the last rows left behind, so the next row's peak is its own."""
    gc.collect()
    if setup.device == "cuda":
        torch.cuda.empty_cache()


def time_steps(setup: Setup, step: Callable[[], None]) -> tuple[float, float]:
    """(seconds per timed step, peak GiB): CUDA peak allocated, or peak process RSS on CPU."""
    cuda = setup.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # peak from here = what is resident now + this row's work
    # PeakRSS's polling thread would take the GIL from the GPU's kernel launches: CPU only
    with nullcontext() if cuda else PeakRSS() as rss:
        for _ in range(setup.warmup):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(setup.steps):
            step()
        sync()
        seconds = (time.perf_counter() - start) / setup.steps
    return seconds, (torch.cuda.max_memory_allocated() if cuda else rss.peak) / 2**30


def measure(setup: Setup, row: Row, step: Callable[[], None]) -> Row:
    """Fill ``row`` from timing ``step``; running out of GPU memory is a result, not a crash."""
    try:
        seconds, row.peak_gib = time_steps(setup, step)
        row.samples_per_s = setup.batch / seconds
    except torch.cuda.OutOfMemoryError:
        row.note = f"OOM at batch {setup.batch}"
    return row


def measure_variant(setup: Setup, variant: str, compiled: bool, flops: dict[str, float]) -> list[Row]:
    """Live then cached rows of one variant; one model (and one compilation) serves both."""
    free_memory(setup)
    model, params = build_model(setup, variant, setup.device)
    if compiled:
        model.unet.compile()
    step = partial(train_step, setup, model, torch.optim.AdamW(params, lr=1e-4))
    encoders = setup.build_encoders(setup.device).frozen(torch.bfloat16 if setup.amp else torch.float32)
    raw = raw_inputs(setup, encoders)
    with setup.autocast:
        cached = encode_live(encoders, raw)  # same shapes and dtypes as live: no recompilation
    live = measure(setup, Row(variant, "live", compiled, tflop_per_sample(flops, variant, "live")),
                   lambda: step(lambda: encode_live(encoders, raw)))
    del encoders, raw  # training from stored outputs: the encoders are not in memory
    model.zero_grad(set_to_none=True)
    free_memory(setup)
    cached_row = Row(variant, "cached", compiled, tflop_per_sample(flops, variant, "cached"))
    rows = [live, measure(setup, cached_row, lambda: step(lambda: cached))]
    del model, step, cached
    if compiled:
        torch._dynamo.reset()  # or this UNet's compiled graphs stay cached
    return rows


def run_rows(setup: Setup, variants: list[str], compile_modes: list[bool], budget_s: float) -> list[Row]:
    """Every row; a compiled variant starts only if its expected compile+run still fits ``budget_s``."""
    start, compile_cost, rows = time.perf_counter(), FIRST_COMPILE_GUESS_S, []
    flops = count_flops(setup)
    for compiled in compile_modes:
        for variant in variants:
            elapsed = time.perf_counter() - start
            print(f"bench_gpu: {elapsed:.0f} s, {variant}, compile={compiled}", file=sys.stderr, flush=True)
            if compiled and elapsed + compile_cost > budget_s:
                rows += note_rows(flops, variant, "skipped: --time-budget")
                continue
            try:
                rows += measure_variant(setup, variant, compiled, flops)
            except Exception as error:  # noqa: BLE001 -- a failed compiler must not lose the rows measured so far
                if not compiled:
                    raise
                print(f"bench_gpu: torch.compile failed: {error}", file=sys.stderr)
                torch._dynamo.reset()
                rows += note_rows(flops, variant, f"compile failed: {type(error).__name__}")
            if compiled:
                compile_cost = time.perf_counter() - start - elapsed
    return rows


def note_rows(flops: dict[str, float], variant: str, note: str) -> list[Row]:
    """Compiled rows of ``variant`` that carry a note instead of measurements."""
    return [Row(variant, e, True, tflop_per_sample(flops, variant, e), note=note) for e in ENCODINGS]


def card_peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name, or None for a card not in PEAK_BF16_TFLOPS."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key.lower() in name.lower()), None)


def format_table(rows: list[Row], peak_tflops: float | None) -> str:
    """One markdown table; MFU = FLOPs per sample × samples/s ÷ the card's peak."""
    lines = ["| variant | encoding | compile | samples/s | peak GiB | TFLOP/sample | MFU % |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r.variant} | {r.encoding} | {'yes' if r.compiled else 'no'} |"
        if r.samples_per_s is None:
            lines.append(f"{head} {r.note} | | {r.tflop_per_sample:.3g} | |")
            continue
        mfu = f"{100 * r.tflop_per_sample * r.samples_per_s / peak_tflops:.3g}" if peak_tflops else "n/a"
        lines.append(f"{head} {r.samples_per_s:.3g} | {r.peak_gib:.3g} | {r.tflop_per_sample:.3g} | {mfu} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=1024, help="pixels, a multiple of 64")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure with torch.compile on the UNet (default: on, on a GPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="as trainer.gradient_checkpointing")
    parser.add_argument("--time-budget", type=float, default=420.0,
                        help="seconds; compiled rows that would end later are skipped")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak (default: from its name)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny models on CPU, fp32, batch 1, one step, no compile (checks the code path)")
    args = parser.parse_args(argv)
    if min(args.batch, args.steps) < 1 or args.warmup < 0 or args.resolution % 64 or (args.peak_tflops or 1) <= 0:
        parser.error("need --batch, --steps, --peak-tflops > 0, --warmup >= 0, --resolution a multiple of 64")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --dry-run to check the code path on CPU")
    return args


def make_setup(args: argparse.Namespace) -> Setup:
    """Full-size SDXL on the GPU in bf16, or the tiny models on CPU in fp32 for --dry-run."""
    if args.dry_run:
        return Setup(tiny_unet_config(), tiny_encoders, "cpu", batch=1, resolution=64, amp=False, warmup=0,
                     steps=1, gradient_checkpointing=args.gradient_checkpointing)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return Setup(load_reference_config("sdxl_unet"), sdxl_encoders, "cuda", args.batch, args.resolution,
                 amp=True, warmup=args.warmup, steps=args.steps, gradient_checkpointing=args.gradient_checkpointing)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup = make_setup(args)
    name = "cpu (dry run, tiny models)" if args.dry_run else torch.cuda.get_device_name()
    # A dry run's MFU only checks the arithmetic: 1 TFLOP/s is a nominal CPU peak.
    peak = args.peak_tflops or (1.0 if args.dry_run else card_peak_tflops(name))
    compile_modes = [False, True] if (args.compile is not False and not args.dry_run) else [False]
    print(f"device: {name}; peak bf16 {peak or 'unknown (pass --peak-tflops)'} TFLOP/s; batch {setup.batch} at "
          f"{setup.resolution}²; {setup.warmup} warm-up + {setup.steps} timed steps; "
          f"{'bf16 autocast, TF32' if setup.amp else 'fp32'}; gradient checkpointing "
          f"{'on' if setup.gradient_checkpointing else 'off'}\n")
    print(format_table(run_rows(setup, args.variants, compile_modes, args.time_budget), peak))


if __name__ == "__main__":
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting random-weight models with .to() warns each time
    main()
