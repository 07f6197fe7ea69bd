"""How much GPU memory adapter training needs, per GPU, before you rent one.

    python -m instantstyle.plan_memory --base flux --blocks all --batch 1 --resolution 1024 \\
        [--quantize none|int8|fp8|nf4] [--shard-gpus N] [--gradient-checkpointing] [--cached] [--adam8bit]

``--base`` is ``sdxl``, ``sd15``, ``flux`` (the public configs kept in the package) or a diffusers folder.
Every number comes from the configs on the ``meta`` device (nothing is downloaded or allocated):

- frozen weights: parameter counts × bytes (bf16; a quantized nn.Linear weight at its quantized size),
  the denoiser divided over ``--shard-gpus`` plus the two largest blocks gathered at a time;
- adapter: fp32 weights + fp32 gradients + AdamW's two fp32 moments (8-bit AdamW: two bytes);
- activations: what autograd saves in one training forward (``instantstyle.activation_memory``), plus
  half the largest checkpoint unit as backward workspace (a whole one, recomputed, with checkpointing);
- the frozen encoders' pass (``--cached`` skips it): five times the VAE encoder's largest tensor;
- 1 GiB for the CUDA context and kernels.

The peak is the resident weights plus the larger of the encoder phase and the training phase. A card
fits when the peak is at most 95 % of it (allocator fragmentation). docs/memory.md explains the model
and gives the tables for FLUX.1-dev and SDXL.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported by the functions that need it: --help and bad input answer at once
    import torch

    from .activation_memory import ActivationCount
    from .model_sizes import MetaBase

GIB = 2**30
CARDS_GB = (24, 48, 80)
USABLE = 0.95                 # of a card's memory, the rest lost to allocator fragmentation
RUNTIME_BYTES = 1 * GIB       # CUDA context, cuBLAS/cuDNN workspaces
QUANTIZE = ("none", "int8", "fp8", "nf4")  # none + model_sizes.QUANTIZED_BYTES
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
# The VAE encoder's peak without grad, in tensors of its largest size (input, norm, activation, conv
# output, residual): measured 5 on the tiny VAE (tests/test_plan_memory.py).
ENCODER_PASS_TENSORS = 5


@dataclass(frozen=True)
class PlanOptions:
    """One training setting to plan for (batch is per GPU)."""

    blocks: str = "style"
    batch: int = 1
    resolution: int = 1024
    quantize: str = "none"
    shard_gpus: int = 1
    gradient_checkpointing: bool = False
    cached: bool = False
    adam8bit: bool = False
    dtype: str = "bf16"  # of the frozen networks and their activations: bf16 | fp32


@dataclass
class MemoryPlan:
    """Estimated bytes per GPU, by part; ``peak`` is what must fit."""

    resident: dict[str, float] = field(default_factory=dict)  # held the whole run
    training: dict[str, float] = field(default_factory=dict)  # held during forward + backward
    encoding: float = 0.0                                      # transient of the frozen encoders (no grad)
    trainable_params: int = 0

    @property
    def training_step(self) -> float:
        """Bytes of one training step beyond the resident weights."""
        return sum(self.training.values())

    @property
    def peak(self) -> float:
        """Bytes per GPU at the worst moment: resident weights + the larger phase + the CUDA runtime."""
        return sum(self.resident.values()) + max(self.training_step, self.encoding) + RUNTIME_BYTES

    def fits(self, card_gb: float) -> bool:
        """True when the peak leaves the fragmentation margin free on a card of ``card_gb`` GiB."""
        return self.peak <= USABLE * card_gb * GIB


def plan_memory(base: MetaBase, options: PlanOptions) -> MemoryPlan:
    """The memory plan of training an adapter on ``base`` with ``options`` (``base`` gets the adapter and dtype)."""
    import torch

    from .model_sizes import install_meta_adapter, parameter_count

    dtype_bytes = DTYPE_BYTES[options.dtype]
    for param in base.denoiser.parameters():  # not .to(): diffusers warns about fp32-only modules there
        param.data = param.data.to(torch_dtype(options))
    adapter = install_meta_adapter(base, options.blocks)
    plan = MemoryPlan(trainable_params=parameter_count(adapter))
    plan.resident = frozen_bytes(base, options, dtype_bytes)
    optimizer = 2 if options.adam8bit else 8
    plan.resident["adapter (weights, grads, optimizer)"] = plan.trainable_params * (4 + 4 + optimizer)
    count = training_activations(base, adapter, options)
    # Backward walks the units in reverse, freeing each one's saved tensors as it makes their gradients.
    # Measured on the tiny bases (tests/test_plan_memory.py), that adds about half the largest unit
    # above what was saved; with checkpointing, one recomputed unit at a time, about a whole unit.
    workspace = count.largest_unit if options.gradient_checkpointing else count.largest_unit / 2
    plan.training = {"activations kept for backward": count.saved,
                     "backward (one unit recomputed)" if options.gradient_checkpointing
                     else "backward workspace": workspace}
    if not options.cached:
        plan.encoding = ENCODER_PASS_TENSORS * encoder_largest_tensor(base, options) * dtype_bytes / 4
    return plan


def torch_dtype(options: PlanOptions) -> torch.dtype:
    """The options' dtype as a torch dtype."""
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[options.dtype]


def frozen_bytes(base: MetaBase, options: PlanOptions, dtype_bytes: int) -> dict[str, float]:
    """Resident frozen weights per GPU: the (quantized, sharded) denoiser and, unless cached, the encoders."""
    from .model_sizes import weight_bytes

    denoiser = weight_bytes(base.denoiser, dtype_bytes, options.quantize)
    if options.shard_gpus > 1:  # FSDP: a 1/N shard, plus the unit in use and the one prefetched
        units = sorted((weight_bytes(u, dtype_bytes, options.quantize) for u in shard_units(base)), reverse=True)
        denoiser = denoiser / options.shard_gpus + sum(units[:2])
    parts = {f"frozen {'transformer' if base.family == 'flux' else 'UNet'}": denoiser}
    if not options.cached:
        for name, module in base.encoders.items():
            # FLUX's T5 is quantized with the transformer (it is 9 GiB); the small encoders never are.
            quantize = options.quantize if name.startswith("text_encoder_2 (T5)") else "none"
            parts[f"frozen {name}"] = weight_bytes(module, dtype_bytes, quantize)
    return parts


def shard_units(base: MetaBase) -> list[torch.nn.Module]:
    """The denoiser's blocks that FSDP gathers one at a time."""
    d = base.denoiser
    if base.family == "flux":
        return [*d.transformer_blocks, *d.single_transformer_blocks]
    return [*d.down_blocks, *([d.mid_block] if d.mid_block is not None else []), *d.up_blocks]


def training_activations(base: MetaBase, adapter: torch.nn.Module, options: PlanOptions) -> ActivationCount:
    """Saved activations of one training forward at the options' batch and resolution."""
    from .activation_memory import count_saved_activations

    return count_saved_activations(base.denoiser, lambda: training_forward(base, adapter, options),
                                   checkpointing=options.gradient_checkpointing)


def training_forward(base: MetaBase, adapter: torch.nn.Module, options: PlanOptions,
                     device: str | torch.device = "meta") -> torch.Tensor:
    """The loss of one training forward of the adapted denoiser on random inputs shaped as the trainer's."""
    import torch

    with torch.device(device):
        if base.family == "flux":
            return _flux_forward(base, adapter, options)
        return _unet_forward(base, adapter, options)


def _flux_forward(base: MetaBase, adapter, options: PlanOptions) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    from .flux_flow import pack_latents, transformer_inputs

    config, b, side, dtype = base.denoiser.config, options.batch, options.resolution // 8, torch_dtype(options)
    latents = torch.randn(b, config.in_channels // 4, side, side)
    prompt = torch.randn(b, base.text_tokens, config.joint_attention_dim, dtype=dtype)
    pooled = torch.randn(b, config.pooled_projection_dim, dtype=dtype)
    embeds, sigmas = torch.randn(b, base.image_embed_dim), torch.rand(b)
    inputs = transformer_inputs(base.denoiser, latents, sigmas, prompt, pooled)
    prediction = base.denoiser(**inputs, joint_attention_kwargs=adapter.attention_kwargs(embeds)).sample
    return F.mse_loss(prediction.float(), pack_latents(latents).float())


def _unet_forward(base: MetaBase, adapter, options: PlanOptions) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    config, b, side, dtype = base.denoiser.config, options.batch, options.resolution // 8, torch_dtype(options)
    latents = torch.randn(b, config.in_channels, side, side, dtype=dtype)
    prompt = torch.randn(b, base.text_tokens, config.cross_attention_dim, dtype=dtype)
    embeds, timesteps = torch.randn(b, base.image_embed_dim), torch.randint(0, 1000, (b,))
    added = None
    if base.family == "sdxl":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(b, pooled, dtype=dtype),
                 "time_ids": torch.randn(b, 6, dtype=dtype)}
    tokens = adapter.image_tokens(embeds)
    prediction = base.denoiser(latents, timesteps, encoder_hidden_states=(prompt, tokens),
                               added_cond_kwargs=added).sample
    return F.mse_loss(prediction.float(), latents.float())


def encoder_largest_tensor(base: MetaBase, options: PlanOptions) -> int:
    """fp32 bytes of the largest tensor the VAE encoder makes from a batch (the encoders' biggest)."""
    import torch

    from .activation_memory import largest_activation

    vae = base.encoders["vae"]
    with torch.device("meta"):
        pixels = torch.empty(options.batch, 3, options.resolution, options.resolution)
    return largest_activation(lambda: vae.encode(pixels))


def not_in_trainer(options: PlanOptions) -> list[str]:
    """The planned options ``python -m train`` does not offer together (the plan is then a forecast)."""
    missing = [(options.quantize != "none" and options.shard_gpus > 1,
                "--quantize with --shard-gpus (FSDP refuses a quantized base)")]
    return [text for absent, text in missing if absent]


def format_plan(label: str, options: PlanOptions, plan: MemoryPlan) -> str:
    """The plan as a readable block: the setting, each part, the peak, and the verdict per card size."""
    setting = (f"{label}: blocks={options.blocks}, batch {options.batch} per GPU, {options.resolution} px, "
               f"quantize={options.quantize}, {options.shard_gpus} GPU(s) sharding the denoiser, "
               f"gradient checkpointing {'on' if options.gradient_checkpointing else 'off'}, "
               f"{'cached embeddings' if options.cached else 'live encoders'}, "
               f"{'8-bit AdamW' if options.adam8bit else 'AdamW'}")
    rows = [*plan.resident.items(), *plan.training.items()]
    if plan.encoding:
        rows.append(("encoders' pass (before the step; the larger counts)", plan.encoding))
    rows.append(("CUDA context and workspaces", RUNTIME_BYTES))
    width = max(len(name) for name, _ in rows)
    lines = [setting, f"  trainable parameters: {plan.trainable_params / 1e6:,.1f}M"]
    lines += [f"  {name:<{width}}  {value / GIB:8.2f} GiB" for name, value in rows]
    lines.append(f"  {'peak per GPU':<{width}}  {plan.peak / GIB:8.2f} GiB")
    lines.append("  fits: " + "   ".join(f"{gb} GB {'yes' if plan.fits(gb) else 'no'}" for gb in CARDS_GB))
    lines += [f"  note: not in python -m train yet: {text}" for text in not_in_trainer(options)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of ``python -m instantstyle.plan_memory``."""
    parser = argparse.ArgumentParser(prog="python -m instantstyle.plan_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="sdxl, sd15, flux, or a diffusers folder")
    parser.add_argument("--image-encoder", help="image encoder folder when the base folder has none")
    parser.add_argument("--blocks", help="preset, all, or comma-separated blocks (default: style; all for FLUX)")
    parser.add_argument("--batch", type=int, default=1, help="per GPU")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--quantize", choices=QUANTIZE, default="none", help="frozen denoiser (and FLUX's T5)")
    parser.add_argument("--shard-gpus", type=int, default=1, help="GPUs the frozen denoiser is sharded over (FSDP)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--cached", action="store_true", help="train from the embedding cache (no encoders)")
    parser.add_argument("--adam8bit", action="store_true", help="optim=adamw8bit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Print the plan; a bad base, block or number is one ``error:`` line and exit status 2."""
    args = parse_args(argv)
    if args.batch < 1 or args.shard_gpus < 1 or args.resolution < 16 or args.resolution % 16:
        print("error: --batch and --shard-gpus must be ≥ 1 and --resolution a multiple of 16", file=sys.stderr)
        sys.exit(2)
    from .quiet import quiet_libraries

    quiet_libraries()
    from .model_sizes import meta_base

    try:
        base = meta_base(args.base, image_encoder=args.image_encoder)
        options = PlanOptions(args.blocks or ("all" if base.family == "flux" else "style"), args.batch,
                              args.resolution, args.quantize, args.shard_gpus, args.gradient_checkpointing,
                              args.cached, args.adam8bit)
        plan = plan_memory(base, options)
    except (ValueError, OSError) as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
    print(format_plan(base.label, options, plan))


if __name__ == "__main__":
    main()
