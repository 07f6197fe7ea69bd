"""The committed toy base: small safetensors that a stock pipeline loads, and a style adapter learns style on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from benchmarks import toy_models
from benchmarks.measure_toy_base import prompt_accuracy
from benchmarks.shape_classifier import load_classifier, palette_probability
from data_tools.toy_data import reference_image, references, render_dataset
from instantstyle.generate import StyleGenerator
from instantstyle.models import load_base
from train.config import compose
from benchmarks.toy_adapter import train_toy_adapter

BASE = Path(__file__).resolve().parents[1] / "data_tools" / "toy_base"
SAMPLE_STEPS = 12
ADAPTER_STEPS = 200  # batch 16, lr 3e-3: about 60 s on a shared core
MIN_PALETTE_GAIN = 0.05  # mean rise of the classifier's probability of the reference's palette
REFERENCES = references(2)
# "a {shape}", 2 images per shape at fixed seeds, 20 steps, CFG 5; chance is 1/8. The card's figure
# (4 per shape) is re-measured by `python -m benchmarks.measure_toy_base`.
PROMPT_ACCURACY_FLOOR = 0.5


@pytest.fixture(scope="module")
def classifier():
    return load_classifier(BASE / "classifier")


def test_committed_weights_are_small_safetensors_a_stock_loader_reads():
    files = list(BASE.rglob("*.safetensors"))
    assert files and not list(BASE.rglob("*.bin")) and not list(BASE.rglob("*.pt"))
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
    base = load_base(str(BASE))  # checks the image encoder and text_encoder_2 share one space
    assert base.family == "sdxl" and base.image_encoder.config.image_size == 64


@pytest.fixture(scope="module")
def pipe():
    pipe = StableDiffusionXLPipeline.from_pretrained(str(BASE))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_base_draws_the_prompted_object(pipe, classifier):
    result = prompt_accuracy(pipe, classifier, per_shape=2, seed=0)
    assert result["accuracy"] >= PROMPT_ACCURACY_FLOOR, result


def test_prompt_accuracy_fails_on_an_untrained_unet(pipe, classifier):
    """The check above can fail: the same pipeline with random UNet weights stays near chance."""
    trained = pipe.unet
    try:
        torch.manual_seed(0)
        pipe.unet = toy_models.build_unet().eval()
        assert prompt_accuracy(pipe, classifier, per_shape=2, seed=0)["accuracy"] < PROMPT_ACCURACY_FLOOR / 2
    finally:
        pipe.unet = trained


def test_demo_trains_the_toy_style_block_on_the_toy_base():
    cfg = compose(["experiment=demo"])
    assert list(cfg.blocks.targets) == [toy_models.STYLE_BLOCK] and cfg.model.path == "data_tools/toy_base"


def test_style_adapter_moves_palette_toward_the_reference(classifier):
    base = load_base(str(BASE))
    # The toy UNet's style block (found by probing), alone: the adapter the demo trains.
    adapter = train_toy_adapter(base, render_dataset(2000, seed=20_000), [toy_models.STYLE_BLOCK], steps=ADAPTER_STEPS,
                                lr=3e-3, seed=0, progress=False)
    generator = StyleGenerator.from_base(base, adapter)
    generator.pipe.set_progress_bar_config(disable=True)
    gains = []
    for ref in REFERENCES:
        style = reference_image(ref)
        prompts = ["a square", "a star"]
        with_adapter = generator.generate(style, prompts, scale=1.0, steps=SAMPLE_STEPS, seed=1)
        without = generator.generate(style, prompts, scale=0.0, steps=SAMPLE_STEPS, seed=1)
        gains.append(palette_probability(classifier, with_adapter, ref["palette"])
                     - palette_probability(classifier, without, ref["palette"]))
    assert sum(gains) / len(gains) > MIN_PALETTE_GAIN, gains
