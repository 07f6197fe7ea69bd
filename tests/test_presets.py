"""SD 1.5 presets select exactly the layers InstantStyle's reference code (infer_style_sd15.py) targets."""

from __future__ import annotations

import pytest
from diffusers import UNet2DConditionModel

from instantstyle.blocks import (
    SD15_PRESETS,
    block_names,
    cross_attention_layers,
    preset_blocks,
    resolve_blocks,
    select_layers,
)
from instantstyle.reference_configs import load_reference_config

# The reference's target_blocks for SD 1.5, as written in its infer_style_sd15.py.
REFERENCE_TARGETS = {
    "style": ["up_blocks.1"],
    "style_layout": ["down_blocks.2", "mid_block", "up_blocks.1"],
}


@pytest.fixture(scope="module")
def sd15_layers() -> list[str]:
    """Processor names of a UNet with SD 1.5's block layout and tiny channels."""
    config = load_reference_config("sd15_unet")
    config.update(block_out_channels=[16, 16, 32, 32], norm_num_groups=8, cross_attention_dim=16, sample_size=8)
    return list(UNet2DConditionModel.from_config(config).attn_processors)


def reference_selection(layers: list[str], targets: list[str]) -> list[str]:
    """The reference's rule: a cross-attention processor is selected when a target is a substring of its name."""
    return [name for name in cross_attention_layers(layers) if any(target in name for target in targets)]


@pytest.mark.parametrize("preset", sorted(REFERENCE_TARGETS))
def test_sd15_preset_selects_the_reference_layers(sd15_layers, preset):
    ours = select_layers(sd15_layers, resolve_blocks(preset, "sd15"))
    assert ours == reference_selection(sd15_layers, REFERENCE_TARGETS[preset])


def test_sd15_presets_cover_whole_stages(sd15_layers):
    style = select_layers(sd15_layers, resolve_blocks("style", "sd15"))
    assert block_names(style) == [f"up_blocks.1.attentions.{i}" for i in range(3)]
    both = select_layers(sd15_layers, resolve_blocks("style_layout", "sd15"))
    # UNet order (down, up, mid), the order export ids follow.
    assert block_names(both) == ["down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "up_blocks.1.attentions.0",
                                 "up_blocks.1.attentions.1", "up_blocks.1.attentions.2", "mid_block.attentions.0"]
    layout = select_layers(sd15_layers, resolve_blocks("layout", "sd15"))
    assert sorted(layout + style) == sorted(both) and not set(layout) & set(style)


def test_earlier_narrow_choices_stay_available(sd15_layers):
    narrow = {name: block_names(select_layers(sd15_layers, preset_blocks(name, "sd15")))
              for name in ("style_narrow", "layout_narrow", "style_layout_narrow")}
    assert narrow == {"style_narrow": ["up_blocks.1.attentions.1"], "layout_narrow": ["down_blocks.2.attentions.1"],
                      "style_layout_narrow": ["down_blocks.2.attentions.1", "up_blocks.1.attentions.1"]}


def test_every_sd15_preset_names_existing_blocks(sd15_layers):
    for name, blocks in SD15_PRESETS.items():
        assert select_layers(sd15_layers, blocks), name  # raises UnknownBlockError on a typo
