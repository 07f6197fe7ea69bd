"""Decoupled cross-attention: text attention plus a separate, scaled image-token attention.

``out = to_out(attn(q, K_text, V_text) + scale * attn(q, to_k_ip(ip), to_v_ip(ip)))``

The UNet is called with ``encoder_hidden_states=(text_states, image_tokens)``. Target
layers use ``DecoupledCrossAttnProcessor``; every other cross-attention layer uses
``TextOnlyCrossAttnProcessor``, which drops the image tokens and computes nothing for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

EncoderStates = torch.Tensor | tuple[torch.Tensor, torch.Tensor | list[torch.Tensor] | None]


def split_encoder_states(states: EncoderStates | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(text_states, image_tokens) from a tensor or a (text, tokens) tuple (diffusers passes a list)."""
    if isinstance(states, tuple):
        text, tokens = states
        if isinstance(tokens, list):
            tokens = tokens[0] if tokens else None
        return text, tokens
    return states, None


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, heads, d // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _prepare_query(attn: Attention, hidden_states: torch.Tensor, temb: torch.Tensor | None):
    """Spatial/group norm and 4D -> tokens, as diffusers' processors do."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = hidden_states.shape
    if hidden_states.ndim == 4:
        b, c, h, w = shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, shape


def _finish(attn: Attention, out: torch.Tensor, residual: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    out = attn.to_out[1](attn.to_out[0](out))
    if len(shape) == 4:
        out = out.transpose(-1, -2).reshape(shape)
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


def text_attention(
    attn: Attention, query_states: torch.Tensor, text: torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard (cross-)attention before the output projection; returns (out, multi-head query)."""
    batch = query_states.shape[0]
    context = query_states if text is None else text
    if text is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    if mask is not None:
        mask = attn.prepare_attention_mask(mask, context.shape[1], batch)
        mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
    query = _heads(attn.to_q(query_states), attn.heads)
    key, value = _heads(attn.to_k(context), attn.heads), _heads(attn.to_v(context), attn.heads)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return _merge_heads(out).to(query.dtype), query


def cross_attention(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: EncoderStates | None,
                    attention_mask: torch.Tensor | None, temb: torch.Tensor | None,
                    branch: DecoupledCrossAttnProcessor | None = None) -> torch.Tensor:
    """Text cross-attention, plus ``branch``'s scaled image attention when it is given and active."""
    text, tokens = split_encoder_states(encoder_hidden_states)
    residual = hidden_states
    states, shape = _prepare_query(attn, hidden_states, temb)
    out, query = text_attention(attn, states, text, attention_mask)
    if branch is not None and tokens is not None and branch.scale != 0:
        out = out + branch.scale * branch.image_attention(attn, query, tokens)
    return _finish(attn, out, residual, shape)


class TextOnlyCrossAttnProcessor:
    """Cross-attention of a non-target layer: image tokens are ignored, no image branch exists."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, **_: object) -> torch.Tensor:
        return cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class DecoupledCrossAttnProcessor(nn.Module):
    """Cross-attention with a trainable image branch (``to_k_ip``/``to_v_ip``) and a scale."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)

    @classmethod
    def from_attention(cls, attn: Attention, scale: float = 1.0) -> DecoupledCrossAttnProcessor:
        """IP-Adapter initialisation: the image branch starts as a copy of the text key/value."""
        out_dim, in_dim = attn.to_k.weight.shape
        proc = cls(out_dim, in_dim, scale).to(dtype=torch.float32, device=attn.to_k.weight.device)
        with torch.no_grad():
            proc.to_k_ip.weight.copy_(attn.to_k.weight)
            proc.to_v_ip.weight.copy_(attn.to_v.weight)
        return proc

    def image_attention(self, attn: Attention, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """attn(q, to_k_ip(tokens), to_v_ip(tokens)) with heads merged, in the query's dtype."""
        tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]).to(self.to_k_ip.weight.dtype)
        key = _heads(self.to_k_ip(tokens).to(query.dtype), attn.heads)
        value = _heads(self.to_v_ip(tokens).to(query.dtype), attn.heads)
        return _merge_heads(F.scaled_dot_product_attention(query, key, value)).to(query.dtype)

    def forward(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                attention_mask=None, temb=None, **_: object) -> torch.Tensor:
        return cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, branch=self)
