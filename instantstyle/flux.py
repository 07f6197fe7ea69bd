"""Style-block IP-Adapters for FLUX.1: an image branch on chosen double-stream blocks only.

In a FLUX double-stream block, the image tokens' queries (after ``norm_q``, before
RoPE) also attend to a few projected image-prompt tokens::

    ip = scale * attn(norm_q(to_q(x)), to_k_ip(tokens), to_v_ip(tokens))

and the block adds ``ip`` to its image stream after the feed-forward, ungated. This is
exactly what diffusers' ``FluxIPAdapterAttnProcessor`` computes for XLabs-format files,
so an adapter trained here exports to a file stock ``FluxPipeline.load_ip_adapter``
reads (see ``flux_export``). Unlike the stock loader, which puts a branch on every
double-stream block, ``install_flux_adapter`` gives one only to the chosen blocks: every
other block keeps diffusers' plain ``FluxAttnProcessor`` and computes nothing for the
image tokens. Single-stream blocks never get a branch (the format has no place for one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor
from torch import nn

from .projection import ImageProjection

# CLIP ViT-L/14 (projection_dim 768): the image encoder XLabs' FLUX IP-Adapter uses.
DEFAULT_IMAGE_EMBED_DIM = 768


@dataclass(frozen=True)
class FluxAdapterSpec:
    """What a FLUX adapter is: enough to rebuild it on a base model (also written to export metadata)."""

    double_blocks: tuple[int, ...] | None = None  # indices into transformer_blocks; None = all of them
    image_embed_dim: int = DEFAULT_IMAGE_EMBED_DIM
    num_tokens: int = 4
    extra: Mapping[str, str] = field(default_factory=dict)


def double_block_processor(index: int) -> str:
    """The ``attn_processors`` name of double-stream block ``index``."""
    return f"transformer_blocks.{index}.attn.processor"


def resolve_double_blocks(transformer: FluxTransformer2DModel, blocks: Sequence[int] | None) -> list[int]:
    """Sorted, validated double-block indices (``None`` = every double-stream block)."""
    count = transformer.config.num_layers
    if blocks is None:
        return list(range(count))
    bad = [b for b in blocks if not isinstance(b, int) or not 0 <= b < count]
    if bad:
        raise ValueError(f"unknown FLUX double block {bad[0]!r}; valid: 0..{count - 1} (transformer_blocks)")
    if not blocks:
        raise ValueError("no FLUX double block chosen; give at least one index or None for all")
    return sorted(set(blocks))


def check_stock_loadable(num_tokens: int, joint_attention_dim: int) -> None:
    """Fail early if diffusers' loader would infer another token count from the projection's shape."""
    # The loader reads 16 tokens only when proj.weight has 65536 rows, and 4 otherwise.
    inferred = 16 if num_tokens * joint_attention_dim == 65536 else 4
    if inferred != num_tokens:
        raise ValueError(f"num_tokens={num_tokens} cannot be read back by diffusers' FLUX IP-Adapter loader "
                         f"(it infers {inferred} for joint_attention_dim={joint_attention_dim}); use 4")


class FluxStyleBlockProcessor(nn.Module):
    """Joint attention of a frozen double-stream block plus a trainable image branch."""

    def __init__(self, joint_attention_dim: int, inner_dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.to_k_ip = nn.Linear(joint_attention_dim, inner_dim, bias=True)
        self.to_v_ip = nn.Linear(joint_attention_dim, inner_dim, bias=True)
        self.joint = FluxAttnProcessor()

    @classmethod
    def for_attention(cls, attn: FluxAttention, joint_attention_dim: int,
                      scale: float = 1.0) -> FluxStyleBlockProcessor:
        """A branch for ``attn``: keys randomly initialised, values zero.

        Image tokens live in the T5 space (joint_attention_dim), not in the block's context
        width, so no text projection of the block can be copied. Zero values make step 0
        exactly the base model (the branch output enters the residual stream with no gate
        or ``to_out``); random keys give each query its own attention pattern from the
        first update on, where zero keys would start every query on the same uniform mix.
        """
        with torch.device(attn.to_q.weight.device):
            proc = cls(joint_attention_dim, attn.inner_dim, scale)
        with torch.no_grad():
            proc.to_v_ip.weight.zero_()
            proc.to_v_ip.bias.zero_()
        return proc

    def image_attention(self, attn: FluxAttention, hidden_states: torch.Tensor,
                        tokens: torch.Tensor) -> torch.Tensor:
        """attn(image queries, to_k_ip(tokens), to_v_ip(tokens)), heads merged, in the states' dtype."""
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim)))
        # diffusers' image projection yields (batch, images, tokens, dim); attend over all of them.
        tokens = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]).to(self.to_k_ip.weight.dtype)
        key = self.to_k_ip(tokens).to(query.dtype).unflatten(-1, (-1, attn.head_dim))
        value = self.to_v_ip(tokens).to(query.dtype).unflatten(-1, (-1, attn.head_dim))
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
        return out.transpose(1, 2).flatten(2).to(hidden_states.dtype)

    # FluxAttention passes keyword arguments by inspecting ``processor.__call__``'s signature,
    # so the image tokens only reach a processor that names ``ip_hidden_states`` here.
    def __call__(self, attn: FluxAttention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None,
                 ip_hidden_states: torch.Tensor | list[torch.Tensor] | None = None):
        out = self.joint(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        tokens = ip_hidden_states[0] if isinstance(ip_hidden_states, list) else ip_hidden_states
        if tokens is None or self.scale == 0:
            return out
        # A third output is what makes FluxTransformerBlock add the branch to the image stream.
        return (*out, self.scale * self.image_attention(attn, hidden_states, tokens))


class FluxStyleAdapter(nn.Module):
    """Image projection + the image branches of the chosen double blocks (the only trainable weights)."""

    def __init__(self, spec: FluxAdapterSpec, image_proj: ImageProjection, block_indices: Sequence[int],
                 num_double_blocks: int, processors: Sequence[FluxStyleBlockProcessor]) -> None:
        super().__init__()
        self.spec = spec
        self.image_proj = image_proj
        self.block_indices = list(block_indices)
        self.num_double_blocks = num_double_blocks
        self.layers = nn.ModuleList(processors)

    def image_tokens(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Project CLIP image embeddings to ``num_tokens`` tokens of width joint_attention_dim."""
        weight = next(self.image_proj.parameters())
        return self.image_proj(image_embeds.to(weight.dtype))

    def attention_kwargs(self, image_embeds: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """``joint_attention_kwargs`` for ``FluxTransformer2DModel.forward`` carrying the image tokens."""
        return {"ip_hidden_states": [self.image_tokens(image_embeds)]}

    def set_scale(self, scale: float | Mapping[int, float]) -> None:
        """One scale for every branch, or ``{double_block_index: scale}`` (unlisted branches get 0)."""
        for index, proc in zip(self.block_indices, self.layers):
            proc.scale = float(scale.get(index, 0.0)) if isinstance(scale, Mapping) else float(scale)


def install_flux_adapter(transformer: FluxTransformer2DModel, spec: FluxAdapterSpec,
                         image_proj: ImageProjection | None = None) -> FluxStyleAdapter:
    """Freeze ``transformer`` and give only the chosen double blocks an image branch."""
    config = transformer.config
    check_stock_loadable(spec.num_tokens, config.joint_attention_dim)
    targets = resolve_double_blocks(transformer, spec.double_blocks)
    transformer.requires_grad_(False)
    processors = {name: FluxAttnProcessor() for name in transformer.attn_processors}
    branches = []
    for index in targets:
        attn = transformer.transformer_blocks[index].attn
        branches.append(FluxStyleBlockProcessor.for_attention(attn, config.joint_attention_dim))
        processors[double_block_processor(index)] = branches[-1]
    transformer.set_attn_processor(processors)
    if image_proj is None:
        with torch.device(transformer.device):
            image_proj = ImageProjection(spec.image_embed_dim, config.joint_attention_dim, spec.num_tokens)
    adapter = FluxStyleAdapter(spec, image_proj.to(transformer.device), targets, config.num_layers, branches)
    adapter.requires_grad_(True)
    return adapter

