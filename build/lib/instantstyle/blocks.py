"""Which cross-attention layers get an image branch: the one place that maps layer names to blocks.

A *layer* is a diffusers attention-processor name such as
``up_blocks.0.attentions.1.transformer_blocks.3.attn2.processor``; its *block* is the
attention module it lives in (``up_blocks.0.attentions.1``). Users name blocks, or any
coarser prefix of them (``up_blocks.0``), or a preset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# SDXL presets, from the InstantStyle paper: up_blocks.0.attentions.1 carries style
# (colour, material, atmosphere), down_blocks.2.attentions.1 spatial layout.
SDXL_PRESETS: dict[str, list[str]] = {
    "style": ["up_blocks.0.attentions.1"],
    "layout": ["down_blocks.2.attentions.1"],
    "style_layout": ["up_blocks.0.attentions.1", "down_blocks.2.attentions.1"],
}

# SD 1.5 presets from InstantStyle's reference code (infer_style_sd15.py, `target_blocks`), which the
# authors mark experimental: SD 1.5 has no attention in up_blocks.0, so whole stages are targeted.
SD15_PRESETS: dict[str, list[str]] = {
    "style": ["up_blocks.1"],  # reference: target_blocks=["up_blocks.1"] (style only)
    "layout": ["down_blocks.2", "mid_block"],  # the reference's style+layout minus its style blocks
    "style_layout": ["down_blocks.2", "mid_block", "up_blocks.1"],  # reference: style+layout
    # This project's earlier choice, mapped from SDXL by position (the middle attention of the lowest-
    # resolution up and down stages); a narrower hypothesis to test with `instantstyle.probe_blocks`.
    "style_narrow": ["up_blocks.1.attentions.1"],
    "layout_narrow": ["down_blocks.2.attentions.1"],
    "style_layout_narrow": ["up_blocks.1.attentions.1", "down_blocks.2.attentions.1"],
}

PRESET_NAMES = ("style", "layout", "style_layout", "all")
# "All blocks" as block prefixes: every attention of a diffusers UNet lives under one of these. After
# resolution a block choice is always a tuple of prefixes; the word "all" exists only where users type it.
ALL_BLOCKS = ("down_blocks", "mid_block", "up_blocks")


class UnknownBlockError(ValueError):
    """A block name that matches no cross-attention layer of the UNet."""


def is_cross_attention(layer: str) -> bool:
    """True for the processors of cross-attention (``attn2``) layers."""
    return layer.endswith("attn2.processor")


def block_of(layer: str) -> str:
    """The attention block a processor name belongs to, e.g. ``mid_block.attentions.0``."""
    parts = layer.split(".")
    depth = 3 if parts[0] == "mid_block" else 4
    if len(parts) <= depth or parts[depth - 2] != "attentions":
        raise ValueError(f"not a UNet attention-processor name: {layer!r}")
    return ".".join(parts[:depth])


def cross_attention_layers(processor_names: Iterable[str]) -> list[str]:
    """Cross-attention processor names in UNet order (the order export ids follow)."""
    return [name for name in processor_names if is_cross_attention(name)]


def export_id(position: int) -> int:
    """Key id of the ``position``-th cross-attention layer in IP-Adapter files (1, 3, 5, …).

    The format numbers every attention processor and the cross-attention ones are the odd ids.
    """
    return 2 * position + 1


def block_names(layers: Iterable[str]) -> list[str]:
    """Distinct blocks of the given layers, in order."""
    return list(dict.fromkeys(block_of(layer) for layer in layers))


def preset_blocks(preset: str, family: str) -> list[str]:
    """Block list of a preset for a model family ('sdxl' or 'sd15')."""
    if preset == "all":
        return list(ALL_BLOCKS)
    table = SD15_PRESETS if family == "sd15" else SDXL_PRESETS
    if preset not in table:
        raise UnknownBlockError(f"unknown block preset {preset!r}; valid: {', '.join(PRESET_NAMES)}")
    return list(table[preset])


def _matches(layer: str, prefix: str) -> bool:
    return layer == prefix or layer.startswith(prefix + ".")


def select_layers(layers: Sequence[str], blocks: Sequence[str]) -> list[str]:
    """The cross-attention layers inside ``blocks`` (prefixes), in UNet order.

    Raises ``UnknownBlockError`` naming the valid blocks when a prefix matches nothing.
    """
    cross = cross_attention_layers(layers)
    if tuple(blocks) == ALL_BLOCKS:
        return cross  # a UNet may lack attention in one of the three parts; "all" still means all it has
    if not blocks:
        raise UnknownBlockError("no target blocks given; use a preset (style, layout, style_layout, all)")
    for prefix in blocks:
        if not any(_matches(layer, prefix) for layer in cross):
            valid = ", ".join(block_names(cross))
            raise UnknownBlockError(f"unknown block {prefix!r} — valid: {valid}")
    return [layer for layer in cross if any(_matches(layer, p) for p in blocks)]


def is_preset(name: str, family: str = "sdxl") -> bool:
    """True for a preset name of this family (``all``, the common presets, SD 1.5's ``*_narrow``)."""
    return name in PRESET_NAMES or name in (SD15_PRESETS if family == "sd15" else SDXL_PRESETS)


def resolve_blocks(spec: str | Sequence[str], family: str = "sdxl") -> list[str]:
    """Turn a preset name, a comma-separated string or a list of prefixes into a block list."""
    if isinstance(spec, str):
        if is_preset(spec, family):
            return preset_blocks(spec, family)
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    spec = list(spec)
    if len(spec) == 1 and is_preset(spec[0], family):
        return preset_blocks(spec[0], family)
    return spec
