"""GPU training-step benchmark of the real-size SDXL adapter variants (random weights, no download).

    python -m benchmarks.bench_gpu [--batch 8 --resolution 1024 --warmup 2 --steps 5 --no-compile]
    python -m benchmarks.bench_gpu --dry-run     # the same code path on CPU with the tiny models

Builds the SDXL UNet, VAE, both text encoders and the OpenCLIP bigG image encoder from the configs
in ``instantstyle/configs`` and measures, per variant of ``benchmarks.bench_train``, samples/s, peak memory
and model FLOP utilisation (FLOPs per sample counted on the ``meta`` device). ``live`` encoding runs
the frozen encoders every step; ``cached`` reuses their outputs, computed once before timing, i.e. the
UNet step alone, as when training from precomputed latents and embeddings (encoders not in memory).
Precision follows the trainer: bf16 autocast around the adapted UNet only (the frozen encoders run
in their bf16 weights without autocast, as ``DiffusionTask.encode`` runs them), TF32 on, adapter
fp32; ``tutorial+unet_grad`` keeps the UNet fp32 under autocast, as IP-Adapter's tutorial_train.py does.

Each row is printed (and flushed) as soon as it is measured. ``--time-budget`` bounds the whole run:
every piece of work (FLOP count, model build, eager or compiled row) starts only if its expected
cost still fits, and a timer stops the row in progress at the budget. Running out of GPU memory
(or a cuBLAS/cuDNN allocation failure) is a row, "OOM at batch 8", not the end of the run.
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
from benchmarks.budget import Clock, OutOfTime, is_out_of_memory
from train.task import AdaptedUNet

ENCODINGS = ("live", "cached")
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets; the first name contained wins.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


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
    tflop_per_sample: float | None  # None: not counted within the time budget
    samples_per_s: float | None = None
    peak_gib: float | None = None  # CUDA: peak allocated by tensors; CPU: peak process RSS
    reserved_gib: float | None = None  # CUDA: peak held by the caching allocator (what nvidia-smi sees, minus context)
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
    """The UNet's inputs from the frozen encoders, as ``DiffusionTask.encode`` computes them (no autocast)."""
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
    """Inputs (outside autocast, as the trainer encodes), forward under autocast, MSE, backward, step."""
    inputs = make_inputs()
    with setup.autocast:  # Accelerate wraps only the prepared model's forward in autocast
        pred = model(*inputs)
    F.mse_loss(pred.float(), torch.randn_like(inputs[0])).backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def count_flops(setup: Setup, variants: list[str], clock: Clock) -> dict[str, float]:
    """Training FLOPs of one sample on ``meta``: the encoders ('encoders') and each chosen variant's UNet step.

    Each count starts only if it fits the time budget; what is missing shows as n/a in the table.
    """
    # model FLOPs: what gradient checkpointing recomputes is not counted
    meta = replace(setup, device="meta", batch=1, amp=False, gradient_checkpointing=False)
    flops: dict[str, float] = {}
    if not clock.fits("flops"):
        return flops
    with clock.timing("flops"):
        encoders = setup.build_encoders("meta")
        raw = raw_inputs(meta, encoders)
        with FlopCounterMode(display=False) as counter:
            inputs = encode_live(encoders, raw)
        flops["encoders"] = counter.get_total_flops()
    for variant in variants:
        if not clock.fits("flops"):
            break
        with clock.timing("flops"):
            model, _ = build_model(meta, variant, "meta")
            with FlopCounterMode(display=False) as counter:
                train_step(meta, model, None, lambda: inputs)
            flops[variant] = counter.get_total_flops()
    return flops


def tflop_per_sample(flops: dict[str, float], variant: str, encoding: str) -> float | None:
    """The UNet step's FLOPs, plus the frozen encoders' when they run every step; None when not counted."""
    if variant not in flops or (encoding == "live" and "encoders" not in flops):
        return None
    return (flops[variant] + (flops["encoders"] if encoding == "live" else 0.0)) / 1e12


def free_memory(setup: Setup) -> None:
    """Drop what the last rows left behind, so the next row's peak is its own."""
    gc.collect()
    if setup.device == "cuda":
        torch.cuda.empty_cache()


def time_steps(setup: Setup, step: Callable[[], None]) -> tuple[float, float, float | None]:
    """(seconds per timed step, peak allocated GiB, peak reserved GiB); on CPU peak RSS and no reserve."""
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
    if cuda:
        return seconds, torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    return seconds, rss.peak / 2**30, None


def measure(setup: Setup, row: Row, step: Callable[[], None]) -> Row:
    """Fill ``row`` from timing ``step``."""
    seconds, row.peak_gib, row.reserved_gib = time_steps(setup, step)
    row.samples_per_s = setup.batch / seconds
    return row


def measure_variant(setup: Setup, variant: str, compiled: bool, flops: dict[str, float],
                    emit: Callable[[Row], None]) -> None:
    """Live then cached rows of one variant, each emitted when measured; one model (and compilation) serves both."""
    free_memory(setup)
    model, params = build_model(setup, variant, setup.device)
    if compiled:
        model.unet.compile()
    step = partial(train_step, setup, model, torch.optim.AdamW(params, lr=1e-4))
    encoders = setup.build_encoders(setup.device).frozen(torch.bfloat16 if setup.amp else torch.float32)
    raw = raw_inputs(setup, encoders)
    cached = encode_live(encoders, raw)  # same shapes and dtypes as live: no recompilation
    emit(measure(setup, Row(variant, "live", compiled, tflop_per_sample(flops, variant, "live")),
                 lambda: step(lambda: encode_live(encoders, raw))))
    del encoders, raw  # training from stored outputs: the encoders are not in memory
    model.zero_grad(set_to_none=True)
    free_memory(setup)
    emit(measure(setup, Row(variant, "cached", compiled, tflop_per_sample(flops, variant, "cached")),
                 lambda: step(lambda: cached)))


def run_rows(setup: Setup, variants: list[str], compile_modes: list[bool], budget_s: float,
             emit: Callable[[Row], None] = lambda row: None) -> list[Row]:
    """Every row, each passed to ``emit`` as it is known; work that would not fit ``budget_s`` is skipped."""
    clock, rows = Clock(budget_s, setup.device), []

    def keep(row: Row) -> None:
        rows.append(row)
        emit(row)

    with clock.deadline():
        try:
            with clock.stoppable():
                flops = count_flops(setup, variants, clock)
        except OutOfTime:
            flops = {}
        for compiled in compile_modes:
            for variant in variants:
                kind = "compiled" if compiled else "eager"
                print(f"bench_gpu: {clock.elapsed():.0f} s, {variant}, compile={compiled}", file=sys.stderr, flush=True)
                done = len(rows)
                if not clock.fits(kind):
                    note_rows(flops, variant, compiled, "skipped: --time-budget", keep)
                    continue
                with clock.timing(kind):
                    note = run_variant(setup, variant, compiled, flops, keep, clock)
                if note:
                    note_rows(flops, variant, compiled, note, keep, skip={r.encoding for r in rows[done:]})
    return rows


def run_variant(setup: Setup, variant: str, compiled: bool, flops: dict[str, float],
                emit: Callable[[Row], None], clock: Clock) -> str:
    """Measure one variant; '' when its rows were emitted, else the note for the rows it could not measure."""
    try:
        with clock.stoppable():
            measure_variant(setup, variant, compiled, flops, emit)
        return ""
    except OutOfTime:
        return "stopped: --time-budget"
    except Exception as error:  # noqa: BLE001 -- a failed row must not lose the rows measured so far
        if is_out_of_memory(error):
            note = f"OOM at batch {setup.batch}"
        elif compiled:
            print(f"bench_gpu: torch.compile failed: {error}", file=sys.stderr, flush=True)
            note = f"compile failed: {type(error).__name__}"
        else:
            raise
    finally:
        if compiled:
            torch._dynamo.reset()  # or this UNet's compiled graphs stay cached
        free_memory(setup)
    return note


def note_rows(flops: dict[str, float], variant: str, compiled: bool, note: str, emit: Callable[[Row], None],
              skip: set[str] = frozenset()) -> None:
    """Rows of ``variant`` that carry a note instead of measurements (all encodings but ``skip``)."""
    for e in ENCODINGS:
        if e not in skip:
            emit(Row(variant, e, compiled, tflop_per_sample(flops, variant, e), note=note))


def card_peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name, or None for a card not in PEAK_BF16_TFLOPS."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key.lower() in name.lower()), None)


TABLE_HEAD = ("| variant | encoding | compile | samples/s | peak alloc GiB | peak reserved GiB | TFLOP/sample "
              "| MFU % |\n|---|---|---|---|---|---|---|---|")


def format_row(r: Row, peak_tflops: float | None) -> str:
    """One markdown line; MFU = FLOPs per sample × samples/s ÷ the card's peak."""
    def num(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3g}"

    head = f"| {r.variant} | {r.encoding} | {'yes' if r.compiled else 'no'} |"
    if r.samples_per_s is None:
        return f"{head} {r.note} | | | {num(r.tflop_per_sample)} | |"
    mfu = (100 * r.tflop_per_sample * r.samples_per_s / peak_tflops
           if peak_tflops and r.tflop_per_sample is not None else None)
    return (f"{head} {r.samples_per_s:.3g} | {r.peak_gib:.3g} | {num(r.reserved_gib)} | {num(r.tflop_per_sample)} "
            f"| {num(mfu)} |")


def format_table(rows: list[Row], peak_tflops: float | None) -> str:
    """The whole markdown table."""
    return "\n".join([TABLE_HEAD, *(format_row(r, peak_tflops) for r in rows)])


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
                        help="seconds for the whole run: work that would end later is skipped, work running "
                             "at the end is stopped")
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
          f"{'on' if setup.gradient_checkpointing else 'off'}\n", flush=True)
    print(TABLE_HEAD, flush=True)  # each row follows as it is measured: a killed run keeps what it printed
    run_rows(setup, args.variants, compile_modes, args.time_budget,
             emit=lambda row: print(format_row(row, peak), flush=True))


if __name__ == "__main__":
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casting random-weight models with .to() warns each time
    main()
