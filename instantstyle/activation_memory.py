"""Activation memory of one adapter training step, counted by running the forward on the ``meta`` device.

What a training step holds between forward and backward is what autograd saves: every tensor an op
saves for backward passes through ``saved_tensors_hooks`` and is counted once per storage; weights
are left out (they are resident anyway). Frozen layers before the first adapted block save nothing,
as in training, because nothing there requires grad. Attention is counted as the GPU's fused
kernels (flash / memory-efficient) keep it: q, k, v, the output and one fp32 log-sum-exp per query
and head, never the N x N score matrix. Gradient checkpointing is counted as diffusers applies it
(``torch.utils.checkpoint`` around each FLUX block, each UNet resnet): such a unit keeps only its
inputs, and one unit at a time is recomputed in backward. On the meta device this takes about a
second for FLUX.1-dev at 1024 px and allocates nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

_SDPA = F.scaled_dot_product_attention


@dataclass(frozen=True)
class ActivationCount:
    """Bytes a forward keeps for backward, and the most any one checkpoint unit saves."""

    saved: int          # held from the end of the forward until backward frees it
    largest_unit: int   # one unit's saved tensors: recomputed at a time under checkpointing


class _FusedAttention(torch.autograd.Function):
    """Shape and saved tensors of a fused attention kernel (what flash attention keeps), no arithmetic."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError("the counting attention has no backward: it only measures a forward")


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False) -> torch.Tensor:
    return _FusedAttention.apply(query, key, value)


@contextmanager
def fused_attention_counting() -> Iterator[None]:
    """Inside the block every ``F.scaled_dot_product_attention`` is the counting kernel."""
    F.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _SDPA


class _SavedTensors:
    """Storages autograd saves, by storage identity; parameters excluded."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.outer: dict[int, int] = {}
        self.largest_unit = 0
        self.checkpointing = False
        self.alive: list[torch.Tensor] = []  # every counted tensor, so no storage address is reused while counting

    def _record(self, into: dict[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage._cdata not in self.exclude:
                into[storage._cdata] = storage.nbytes()
                self.alive.append(tensor)
            return tensor
        return pack

    def unit(self, module: nn.Module, *args) -> object:
        """diffusers' ``_gradient_checkpointing_func``: runs ``module`` and counts what it saves as one unit."""
        inner: dict[int, int] = {}
        with torch.autograd.graph.saved_tensors_hooks(self._record(inner), lambda t: t):
            out = module(*args)
        inputs = {leaf.untyped_storage()._cdata for leaf in tree_leaves(args) if isinstance(leaf, torch.Tensor)}
        # What a unit adds is what it makes: its inputs are held by the unit before it anyway.
        self.largest_unit = max(self.largest_unit, sum(v for k, v in inner.items() if k not in inputs))
        if not self.checkpointing:
            self.outer.update(inner)
        elif inner:  # a checkpointed unit keeps its inputs, and only when something inside needs grad
            pack = self._record(self.outer)
            for leaf in tree_leaves(args):
                if isinstance(leaf, torch.Tensor):
                    pack(leaf)
        return out


def count_saved_activations(model: nn.Module, forward: Callable[[], torch.Tensor], *,
                            checkpointing: bool) -> ActivationCount:
    """Run ``forward`` (a meta-device training forward ending in the loss) and count what it saves."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    counter = _SavedTensors(params)
    counter.checkpointing = checkpointing
    model.enable_gradient_checkpointing(gradient_checkpointing_func=counter.unit)
    try:
        with fused_attention_counting(), torch.autograd.graph.saved_tensors_hooks(
                counter._record(counter.outer), lambda t: t):
            forward()
    finally:
        model.disable_gradient_checkpointing()
    return ActivationCount(sum(counter.outer.values()), counter.largest_unit)


class _LargestOutput(TorchDispatchMode):
    """Tracks the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel() * leaf.element_size())
        return out


@torch.no_grad()
def largest_activation(forward: Callable[[], object]) -> int:
    """Bytes of the largest tensor a (no-grad, meta-device) forward produces."""
    mode = _LargestOutput()
    with fused_attention_counting(), mode:
        forward()
    return mode.largest
