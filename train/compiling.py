"""``trainer.compile``: where torch.compile is applied, and where it is kept out.

Training compiles the denoiser in place (state-dict names, hooks and the pipeline's reference stay
the same). A sharded UNet is compiled block by block after ``fully_shard``: FSDP2's gather and
free hooks sit on the block boundaries, outside every compiled region, instead of breaking one
whole-UNet graph. Validation images and the fixed-batch loss run the same modules eagerly
(``uncompiled``): other shapes and ``no_grad`` would each recompile a graph used once per interval.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def unet_blocks(unet: nn.Module) -> list[nn.Module]:
    """The down, mid and up blocks of a UNet (FLUX: its double- and single-stream blocks): the units FSDP
    shards and compiles one at a time."""
    from diffusers import FluxTransformer2DModel

    if isinstance(unet, FluxTransformer2DModel):
        return [*unet.transformer_blocks, *unet.single_transformer_blocks]
    return [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]


def compile_denoiser(denoiser: nn.Module, sharded: bool) -> None:
    """torch.compile in place: per block on a sharded UNet (call after sharding), else the whole module."""
    for module in unet_blocks(denoiser) if sharded else [denoiser]:
        module.compile()


@contextmanager
def uncompiled(module: nn.Module) -> Iterator[None]:
    """Inside the block ``module`` and its submodules run eagerly; their compiled graphs are kept for after."""
    # nn.Module.compile stores the compiled call here; __call__ falls back to the eager one when it is None.
    saved = [(m, m._compiled_call_impl) for m in module.modules() if getattr(m, "_compiled_call_impl", None)]
    for m, _ in saved:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, compiled in saved:
            m._compiled_call_impl = compiled


def choose_cudnn_benchmark(fixed_shapes: bool) -> bool:
    """cuDNN autotuning on CUDA when every training batch has one shape; returns whether it is on.

    With aspect-ratio buckets each new shape would be autotuned again (seconds each), so it stays off.
    """
    on = fixed_shapes and torch.cuda.is_available()
    torch.backends.cudnn.benchmark = on
    return on
