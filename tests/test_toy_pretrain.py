"""Toy-base pretraining at a toy budget: a stock diffusers folder, deterministic from its seed."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from benchmarks.pretrain_toy_base import main as pretrain
from benchmarks.shape_classifier import load_classifier
from benchmarks.toy_models import build_toy_tokenizer
from instantstyle.blocks import block_names, cross_attention_layers
from instantstyle.models import load_base

TINY_BUDGET = ["--num", "48", "--clip-steps", "2", "--vae-steps", "2", "--classifier-steps", "2",
               "--classifier-num", "32", "--unet-steps", "2"]


def test_pretrain_writes_loadable_deterministic_base(tmp_path):
    pretrain(["--out", str(tmp_path / "a"), *TINY_BUDGET])
    pretrain(["--out", str(tmp_path / "b"), *TINY_BUDGET])
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder_2/model",
                 "image_encoder/model", "classifier/model"):
        a, b = load_file(tmp_path / "a" / f"{part}.safetensors"), load_file(tmp_path / "b" / f"{part}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "a")
    assert "up_blocks.0.attentions.1" in block_names(cross_attention_layers(pipe.unet.attn_processors))
    assert "down_blocks.2.attentions.1" in block_names(cross_attention_layers(pipe.unet.attn_processors))
    base = load_base(str(tmp_path / "a"))  # checks image encoder and text_encoder_2 share one space
    assert base.family == "sdxl" and base.image_encoder.config.image_size == 64
    assert pipe.feature_extractor.crop_size["height"] == 64
    load_classifier(tmp_path / "a" / "classifier")


def test_tokenizer_keeps_every_caption_word_whole():
    tok = build_toy_tokenizer()
    caption = "a thick gold-outlined crimson triangle with polka dots on a checkered navy background"
    assert len(tok(caption).input_ids) == 2 + len(caption.replace("-", " - ").split())
