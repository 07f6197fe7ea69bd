"""Block targeting maps layer names to blocks and rejects unknown names with the valid list."""

import pytest

from instantstyle.blocks import (
    UnknownBlockError,
    block_of,
    block_names,
    cross_attention_layers,
    resolve_blocks,
    select_layers,
)


def test_block_of_handles_down_up_and_mid():
    assert block_of("up_blocks.0.attentions.1.transformer_blocks.3.attn2.processor") == "up_blocks.0.attentions.1"
    assert block_of("mid_block.attentions.0.transformer_blocks.9.attn2.processor") == "mid_block.attentions.0"
    with pytest.raises(ValueError):
        block_of("conv_in")


def test_presets_select_the_paper_blocks(tiny_base):
    names = list(tiny_base.unet.attn_processors)
    style = select_layers(names, resolve_blocks("style"))
    assert style == [f"up_blocks.0.attentions.1.transformer_blocks.{i}.attn2.processor" for i in range(2)]
    both = select_layers(names, resolve_blocks("style_layout"))
    assert {block_of(n) for n in both} == {"up_blocks.0.attentions.1", "down_blocks.2.attentions.1"}
    assert select_layers(names, resolve_blocks("all")) == cross_attention_layers(names)
    assert len(cross_attention_layers(names)) == 22


def test_prefixes_and_comma_lists(tiny_base):
    names = list(tiny_base.unet.attn_processors)
    up0 = select_layers(names, resolve_blocks("up_blocks.0"))
    assert block_names(up0) == [f"up_blocks.0.attentions.{i}" for i in range(3)]
    mixed = select_layers(names, resolve_blocks("mid_block, down_blocks.1.attentions.0"))
    assert block_names(mixed) == ["down_blocks.1.attentions.0", "mid_block.attentions.0"]
    # "up_blocks.1" must not match "up_blocks.10..." style names by string prefix alone.
    assert all(n.startswith("up_blocks.1.") for n in select_layers(names, ["up_blocks.1"]))


def test_unknown_block_lists_valid_names(tiny_base):
    names = list(tiny_base.unet.attn_processors)
    with pytest.raises(UnknownBlockError) as err:
        select_layers(names, ["up_blocks.9"])
    message = str(err.value)
    assert "up_blocks.9" in message and "up_blocks.0.attentions.1" in message and "\n" not in message


def test_sd15_presets_point_at_attention_blocks():
    from instantstyle.reference_configs import build_unet

    names = list(build_unet("sd15_unet").attn_processors)
    # Whole stages, as InstantStyle's SD 1.5 reference code targets them (tests/test_presets.py checks the layers).
    assert block_names(select_layers(names, resolve_blocks("style", "sd15"))) == [
        f"up_blocks.1.attentions.{i}" for i in range(3)]
    assert block_names(select_layers(names, resolve_blocks("layout", "sd15"))) == [
        "down_blocks.2.attentions.0", "down_blocks.2.attentions.1", "mid_block.attentions.0"]
