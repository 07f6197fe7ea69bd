"""Turn a diffusers UNet into an InstantStyle-trainable model.

``install_adapter`` freezes the UNet, puts a ``DecoupledCrossAttnProcessor`` on the
cross-attention layers of the target blocks and a ``TextOnlyCrossAttnProcessor`` on all
others, and returns the ``InstantStyleAdapter`` that owns every trainable parameter:
the image projection and the target layers' ``to_k_ip``/``to_v_ip``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .attention import DecoupledCrossAttnProcessor, TextOnlyCrossAttnProcessor
from .blocks import ALL_BLOCKS, cross_attention_layers, export_id, select_layers
from .projection import build_image_projection


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter is: enough to rebuild it on a base model (also written to export metadata)."""

    adapter_type: str = "ip_adapter"
    blocks: tuple[str, ...] = ("up_blocks.0.attentions.1",)  # block prefixes; ALL_BLOCKS = every layer
    image_embed_dim: int = 1280
    num_tokens: int = 4
    resampler_dim: int = 1280
    extra: Mapping[str, str] = field(default_factory=dict)  # base_model, image_encoder, step: provenance

    def to_metadata(self) -> dict[str, str]:
        """The spec as strings: export header metadata and checkpoint identity are both this."""
        return {"adapter_type": self.adapter_type, "target_blocks": json.dumps(list(self.blocks)),
                "num_tokens": str(self.num_tokens), "image_embed_dim": str(self.image_embed_dim),
                "resampler_dim": str(self.resampler_dim), **{k: str(v) for k, v in self.extra.items()}}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> "AdapterSpec":
        """Inverse of ``to_metadata``; also reads older files and checkpoints, which wrote "all" and non-strings."""
        extra = {k: str(meta[k]) for k in ("base_model", "image_encoder", "step") if k in meta}
        return cls(str(meta["adapter_type"]), blocks_from_metadata(meta.get("target_blocks")), int(meta["image_embed_dim"]),
                   int(meta["num_tokens"]), int(meta.get("resampler_dim", 1280)), extra)


def blocks_from_metadata(value: Any) -> tuple[str, ...]:
    """The block tuple of a ``target_blocks`` entry: a JSON list, a list, or the older spelling "all" (or none)."""
    blocks = json.loads(value) if isinstance(value, str) and value[:1] in '["' else value
    return ALL_BLOCKS if blocks in (None, "all") else tuple(blocks)


class InstantStyleAdapter(nn.Module):
    """Image projection + the image branches of the target layers (the only trainable weights)."""

    def __init__(self, spec: AdapterSpec, image_proj: nn.Module, layer_names: Sequence[str],
                 all_layer_names: Sequence[str], processors: Sequence[DecoupledCrossAttnProcessor]) -> None:
        super().__init__()
        self.spec = spec
        self.image_proj = image_proj
        self.layer_names = list(layer_names)
        self.all_layer_names = list(all_layer_names)
        self.layers = nn.ModuleList(processors)

    def image_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Project image features to cross-attention tokens, computed in the adapter's precision."""
        weight = next(self.image_proj.parameters())
        return self.image_proj(image_embeds.to(weight.dtype))

    def export_ids(self) -> list[int]:
        """Export key id of each target layer: 1, 3, 5, ... over ALL cross-attention layers."""
        position = {name: export_id(i) for i, name in enumerate(self.all_layer_names)}
        return [position[name] for name in self.layer_names]

    def set_scale(self, scale: float | Mapping[str, float]) -> None:
        """One scale for every target layer, or ``{block_prefix: scale}`` (unlisted layers get 0)."""
        for name, proc in zip(self.layer_names, self.layers):
            if isinstance(scale, Mapping):
                hits = [s for p, s in scale.items() if name == p or name.startswith(p + ".")]
                proc.scale = float(hits[-1]) if hits else 0.0
            else:
                proc.scale = float(scale)


def attention_module(unet: UNet2DConditionModel, layer: str) -> nn.Module:
    """The ``Attention`` module owning a processor name."""
    return unet.get_submodule(layer.removesuffix(".processor"))


def install_adapter(unet: UNet2DConditionModel, spec: AdapterSpec,
                    image_proj: nn.Module | None = None) -> InstantStyleAdapter:
    """Freeze ``unet`` and give only the target blocks' cross-attention an image branch."""
    names = list(unet.attn_processors.keys())
    all_cross = cross_attention_layers(names)
    targets = select_layers(names, spec.blocks)
    unet.requires_grad_(False)
    processors = {name: proc for name, proc in unet.attn_processors.items()}
    ip_procs = []
    for name in all_cross:
        if name in targets:
            proc = DecoupledCrossAttnProcessor.from_attention(attention_module(unet, name))
            ip_procs.append(proc)
            processors[name] = proc
        else:
            processors[name] = TextOnlyCrossAttnProcessor()
    unet.set_attn_processor(processors)
    if image_proj is None:
        image_proj = build_image_projection(
            spec.adapter_type, image_embed_dim=spec.image_embed_dim,
            cross_attention_dim=unet.config.cross_attention_dim, num_tokens=spec.num_tokens,
            resampler_dim=spec.resampler_dim,
        )
    adapter = InstantStyleAdapter(spec, image_proj.to(unet.device), targets, all_cross, ip_procs)
    adapter.requires_grad_(True)
    return adapter

