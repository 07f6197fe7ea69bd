"""FSDP as this trainer uses it: the frozen UNet (or FLUX transformer) sharded over the ranks, the adapter whole.

``ACCELERATE_CONFIG=fsdp`` selects it. What fills a GPU is the frozen base (SDXL's UNet alone is
4.8 GiB in bf16, FLUX.1's transformer 22.2 GiB); the adapter is much smaller. So the UNet's
down/mid/up blocks, or FLUX's double- and single-stream blocks, are sharded with FSDP2 ``fully_shard``
(each block is gathered for its forward and backward, then freed again), and the
adapter's parameters are left out of the sharding (``ignored_params``): they, their gradients
(averaged over the ranks exactly as DDP averages them), the optimizer state, EMA, checkpoints and
exports stay as in data parallelism. Checkpoints need no gathering, hold no pickle, and resume bitwise.

Accelerate's own FSDP would shard the adapter and its optimizer state too (nothing to gain at this
size, and checkpoints that must be gathered), so the trainer takes the choice over: Accelerate runs
data parallel underneath (optimizer, loss scaling, autocast) and this module shards the frozen network.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.distributed as dist
from torch import nn

from train.compiling import unet_blocks
from train.config import ConfigError
from train.flux_task import AdaptedFluxTransformer
from train.task import AdaptedUNet

log = logging.getLogger(__name__)
# What `accelerate launch` sets for a config with distributed_type FSDP (or DEEPSPEED).
FSDP_VARIABLE, DEEPSPEED_VARIABLE = "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"


def take_over_sharding() -> str | None:
    """"FSDP" when ``accelerate launch`` was asked for it, switched off for Accelerate itself; else None.

    Call before creating the ``Accelerator``: it then sets up plain data parallelism. A DeepSpeed config
    is refused: ZeRO would partition only the adapter's state (tens of MB) into pickled checkpoints.
    """
    if os.environ.get(DEEPSPEED_VARIABLE, "false").lower() == "true":
        raise ConfigError("DeepSpeed configs are not supported: the frozen base is what fills a GPU; "
                          "use ACCELERATE_CONFIG=fsdp to shard it, or ACCELERATE_CONFIG=ddp")
    if os.environ.get(FSDP_VARIABLE, "false").lower() != "true":
        return None
    os.environ[FSDP_VARIABLE] = "false"
    return "FSDP"


class ShardedDenoiser:
    """Mixin of a denoiser + adapter whose frozen network is sharded: runs under the training autocast,
    averages the adapter's gradients over the ranks."""

    autocast: Callable[[], AbstractContextManager]  # Accelerate wraps a prepared model's forward in it; this is not prepared

    @property
    def frozen(self) -> nn.Module:
        """The sharded frozen network (UNet or FLUX transformer)."""
        raise NotImplementedError

    def forward(self, *args, **kwargs) -> torch.Tensor:
        with self.autocast():
            return super().forward(*args, **kwargs)

    @torch.no_grad()
    def average_gradients(self) -> None:
        """Mean of the adapter gradients over the ranks, as DDP computes it (divide, then sum in one flat buffer)."""
        grads = [p.grad for p in self.adapter.parameters() if p.grad is not None]
        if not grads or not dist.is_initialized():
            return
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(dist.get_world_size())
        dist.all_reduce(flat)
        for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(part.view_as(grad))


class ShardedAdaptedUNet(ShardedDenoiser, AdaptedUNet):
    """``AdaptedUNet`` whose frozen UNet is sharded."""

    def __init__(self, unet: nn.Module, adapter: nn.Module, autocast: Callable[[], AbstractContextManager]) -> None:
        AdaptedUNet.__init__(self, unet, adapter)
        self.autocast = autocast

    @property
    def frozen(self) -> nn.Module:
        return self.unet


class ShardedAdaptedFluxTransformer(ShardedDenoiser, AdaptedFluxTransformer):
    """``AdaptedFluxTransformer`` whose frozen FLUX transformer is sharded."""

    def __init__(self, transformer: nn.Module, adapter: nn.Module,
                 autocast: Callable[[], AbstractContextManager]) -> None:
        AdaptedFluxTransformer.__init__(self, transformer, adapter)
        self.autocast = autocast

    @property
    def frozen(self) -> nn.Module:
        return self.transformer


def _shard_blocks(network: nn.Module, blocks: list[nn.Module], adapter: nn.Module, device: torch.device) -> None:
    """One FSDP2 unit per block, then the rest of ``network``; the adapter's parameters stay whole and in sync."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from instantstyle.quantize import is_quantized
    from train.config import ConfigError

    if is_quantized(network):  # FSDP would have to all-gather torchao's tensor subclasses, which is not tested
        raise ConfigError("model.quantize cannot be combined with FSDP yet: use ACCELERATE_CONFIG=ddp "
                          "(quantized bases are small enough to replicate) or model.quantize=none")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    keep = set(adapter.parameters())
    for param in adapter.parameters():  # same seed on every rank already; make it certain, as DDP does
        dist.broadcast(param.data, src=0)
    for block in blocks:  # at most one block's weights are gathered at a time
        fully_shard(block, mesh=mesh, ignored_params=keep & set(block.parameters()))
    fully_shard(network, mesh=mesh, ignored_params=keep & set(network.parameters()))


def shard_frozen_base(base, adapter: nn.Module, device: torch.device,
                      autocast: Callable[[], AbstractContextManager]) -> ShardedDenoiser:
    """The base's denoiser sharded (SDXL UNet or FLUX transformer), with the adapter, as one module."""
    if base.family != "flux":
        return shard_frozen_unet(base.unet, adapter, device, autocast)
    transformer = base.transformer
    # A branch lives in its double block's attention processor: ignored_params keeps it out of the shards.
    blocks = unet_blocks(transformer)
    _shard_blocks(transformer, blocks, adapter, device)
    log.info("FSDP: frozen FLUX transformer sharded over %d ranks in %d blocks; adapter replicated",
             dist.get_world_size(), len(blocks))
    return ShardedAdaptedFluxTransformer(transformer, adapter, autocast)


def shard_frozen_unet(unet: nn.Module, adapter: nn.Module, device: torch.device,
                      autocast: Callable[[], AbstractContextManager]) -> ShardedAdaptedUNet:
    """Shard every down/mid/up block of ``unet`` and the rest of it; the adapter stays whole and in sync."""
    blocks = unet_blocks(unet)
    _shard_blocks(unet, blocks, adapter, device)
    log.info("FSDP: frozen UNet sharded over %d ranks in %d blocks; adapter replicated", dist.get_world_size(),
             len(blocks))
    return ShardedAdaptedUNet(unet, adapter, autocast)


@contextmanager
def whole_unet(model: nn.Module) -> Iterator[None]:
    """Inside the block a sharded UNet holds all its weights on every rank (export reads the untrained layers)."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.frozen.modules() if isinstance(m, FSDPModule)]
    for unit in units:  # a collective: every rank enters the block
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def is_sharded(model: nn.Module) -> bool:
    """True when ``model``'s frozen network is sharded: every rank must then run each forward together."""
    return isinstance(model, ShardedDenoiser)
