"""The recipe measurement: intervals by hand, cells parsed with one-line errors, recipes reach the toy batches."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import toy_models
from data_tools.toy_data import render_dataset
from benchmarks.measure_recipe import RECIPES, parse_cells, summarise
from benchmarks.toy_adapter import toy_batch


def test_summary_gives_mean_and_95_percent_interval_over_seeds():
    rows = [{"blocks": "b", "recipe": "plain", "inference_subtraction": 0.0, "seed": s, "palette_match": v,
             "texture_match": 0.0, "text_alignment": 1.0, "content_leakage": 0.5} for s, v in enumerate([0.2, 0.4, 0.6, 0.8])]
    (entry,) = summarise(rows)
    std = math.sqrt(sum((v - 0.5) ** 2 for v in (0.2, 0.4, 0.6, 0.8)) / 3)
    assert entry["palette_match"] == pytest.approx(0.5) and entry["seeds"] == 4
    assert entry["palette_match_ci"] == pytest.approx(3.182 * std / 2)  # t(0.975, 3 dof) · s / √n
    assert entry["text_alignment_ci"] == 0.0


def test_cells_name_the_toy_style_block_and_reject_unknown_recipes():
    assert parse_cells("style:plain,crop;all:shuffle") == [
        (toy_models.STYLE_BLOCK, "plain"), (toy_models.STYLE_BLOCK, "crop"), ("all", "shuffle")]
    with pytest.raises(ValueError, match="unknown recipe 'blur' — valid: plain"):
        parse_cells("style:blur")


def test_recipes_change_only_the_reference_the_adapter_sees():
    data = render_dataset(4, 64, 0, desc="test")
    idx = torch.arange(4)
    plain = toy_batch(data, idx, torch.Generator().manual_seed(0), 0.0)
    shuffled = toy_batch(data, idx, torch.Generator().manual_seed(0), 0.0, RECIPES["shuffle"].augment())
    assert torch.equal(plain["pixel_values"], shuffled["pixel_values"])  # the diffusion target is untouched
    assert not torch.equal(plain["clip_pixel_values"], shuffled["clip_pixel_values"])
    # Patch shuffle keeps every pixel: the reference's colour content is exactly the same.
    assert torch.equal(plain["clip_pixel_values"].long().sum(dim=(1, 2)), shuffled["clip_pixel_values"].long().sum(dim=(1, 2)))
    assert RECIPES["plain"].augment() is None and RECIPES["decoupled"].content_scale > 0
