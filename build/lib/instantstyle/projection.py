"""Image projections: CLIP image features -> a few cross-attention tokens.

Parameter names follow the public IP-Adapter checkpoints, which diffusers' loader
converts (``proj``/``norm`` -> ``ImageProjection``; the Perceiver ``Resampler`` ->
``IPAdapterPlusImageProjection``), so our exports load in stock diffusers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ADAPTER_TYPES = ("ip_adapter", "ip_adapter_plus")


class ImageProjection(nn.Module):
    """``ip_adapter``: pooled, projected image embedding -> linear -> N tokens -> LayerNorm."""

    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_tokens: int = 4) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.proj = nn.Linear(image_embed_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(tokens)


def _feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    # Index layout (0 norm, 1 linear, 2 gelu, 3 linear) is what diffusers' key conversion expects.
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents attend to [image features; latents] (the IP-Adapter Plus resampler layer)."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        b = q.shape[0]
        q, k, v = (t.view(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head))


class Resampler(nn.Module):
    """``ip_adapter_plus``: Perceiver resampler over the image encoder's penultimate hidden states.

    Depth 4 and 64-wide heads are fixed because diffusers' loader assumes them.
    """

    def __init__(self, image_hidden_dim: int, cross_attention_dim: int, num_tokens: int = 16,
                 dim: int = 1280, depth: int = 4, dim_head: int = 64, ff_mult: int = 4) -> None:
        super().__init__()
        if dim % dim_head:
            raise ValueError(f"resampler width {dim} must be a multiple of dim_head={dim_head}")
        self.latents = nn.Parameter(torch.randn(1, num_tokens, dim) / math.sqrt(dim))
        self.proj_in = nn.Linear(image_hidden_dim, dim)
        self.proj_out = nn.Linear(dim, cross_attention_dim)
        self.norm_out = nn.LayerNorm(cross_attention_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, dim // dim_head), _feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(hidden_states.shape[0], 1, 1)
        features = self.proj_in(hidden_states)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


def build_image_projection(adapter_type: str, *, image_embed_dim: int, cross_attention_dim: int,
                           num_tokens: int | None = None, resampler_dim: int = 1280) -> nn.Module:
    """The projection for ``adapter_type``; ``image_embed_dim`` is the pooled (ip_adapter) or hidden (plus) width."""
    if adapter_type == "ip_adapter":
        return ImageProjection(image_embed_dim, cross_attention_dim, num_tokens or 4)
    if adapter_type == "ip_adapter_plus":
        return Resampler(image_embed_dim, cross_attention_dim, num_tokens or 16, dim=resampler_dim)
    raise ValueError(f"unknown adapter type {adapter_type!r}; valid: {', '.join(ADAPTER_TYPES)}")
