"""CSD and DINO metrics: tiny random models saved locally, loaded by path, checked against hand cosines."""

from __future__ import annotations

import argparse
from collections import OrderedDict

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from instantstyle.style_metrics import (
    CsdEncoder,
    DinoEncoder,
    MetricModelError,
    csd_style_similarity,
    dino_content_leakage,
    read_csd_state,
)

WIDTH, HEADS, LAYERS, PATCH, IMAGE = 128, 2, 2, 16, 32


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualBlock(nn.Module):
    """OpenAI CLIP's pre-norm block, written independently of transformers."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(WIDTH, 4 * WIDTH), gelu=QuickGELU(),
                                             c_proj=nn.Linear(4 * WIDTH, WIDTH)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenAIVisual(nn.Module):
    """OpenAI CLIP's VisionTransformer (``proj`` removed, as CSD does): the reference for CSD features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTH, PATCH, PATCH, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(WIDTH))
        self.positional_embedding = nn.Parameter(torch.zeros((IMAGE // PATCH) ** 2 + 1, WIDTH))
        self.ln_pre, self.ln_post = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[ResidualBlock() for _ in range(LAYERS)])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(len(x), 1, WIDTH), x], dim=1) + self.positional_embedding
        x = self.transformer.resblocks(self.ln_pre(x).transpose(0, 1)).transpose(0, 1)  # (L, N, D) inside
        return self.ln_post(x[:, 0])


def random_csd(seed: int = 0) -> tuple[OpenAIVisual, torch.Tensor]:
    torch.manual_seed(seed)
    visual = OpenAIVisual()
    with torch.no_grad():
        for name, param in visual.named_parameters():
            # Layer norms get non-trivial weights too, so that a swapped ln_1/ln_2 would show.
            is_norm_scale = "ln_" in name and name.endswith("weight")
            param.copy_(torch.randn_like(param) * 0.2 + (1.0 if is_norm_scale else 0.0))
    return visual.eval(), torch.randn(WIDTH, 24) * WIDTH ** -0.5


def csd_state(visual: OpenAIVisual, head: torch.Tensor) -> dict[str, torch.Tensor]:
    """The public checkpoint's state-dict layout: DDP prefix, backbone.*, both heads."""
    state = {f"module.backbone.{k}": v.detach().clone() for k, v in visual.state_dict().items()}
    return {**state, "module.last_layer_style": head.clone(), "module.last_layer_content": torch.randn(WIDTH, 24)}


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(3)]


def hand_cosines(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    a, b = a.double().numpy(), b.double().numpy()
    return [float(u @ v / np.linalg.norm(u) / np.linalg.norm(v)) for u, v in zip(a, b)]


@pytest.fixture(scope="module")
def csd_file(tmp_path_factory):
    visual, head = random_csd()
    path = tmp_path_factory.mktemp("csd") / "csd.safetensors"
    save_file(csd_state(visual, head), path)
    return path, visual, head


def test_csd_features_equal_the_reference_forward(csd_file):
    path, visual, head = csd_file
    encoder = CsdEncoder.from_checkpoint(path)
    assert encoder.model.config.image_size == IMAGE and encoder.model.config.num_attention_heads == HEADS
    pics = images()
    pixels = encoder.processor(pics, return_tensors="pt").pixel_values
    assert pixels.shape == (3, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(visual(pixels) @ head, dim=-1)
    torch.testing.assert_close(encoder.embed_images(pics), expected, atol=1e-5, rtol=1e-5)


def test_csd_style_similarity_is_the_cosine_of_style_vectors(csd_file):
    path, visual, head = csd_file
    encoder = CsdEncoder.from_checkpoint(path)
    generated, references = images(), images()[::-1]
    score = csd_style_similarity(encoder.embed_images(generated), encoder.embed_images(references))
    with torch.no_grad():
        g = visual(encoder.processor(generated, return_tensors="pt").pixel_values) @ head
        r = visual(encoder.processor(references, return_tensors="pt").pixel_values) @ head
    assert score.tolist() == pytest.approx(hand_cosines(g, r), abs=1e-5)
    assert score[1].item() == pytest.approx(1.0, abs=1e-5)  # the middle image is its own reference


def test_public_training_checkpoint_layout_loads(csd_file, tmp_path):
    path, visual, head = csd_file
    # The public checkpoint.pth: optimizer states and the argparse namespace beside the weights.
    checkpoint = {"model_state_dict": csd_state(visual, head), "opt_bb": {}, "opt_proj": {}, "iter": 7,
                  "args": argparse.Namespace(arch="vit_large"), "fp16_scaler": None}
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    from_pth, from_safetensors = read_csd_state(tmp_path / "checkpoint.pth"), read_csd_state(path)
    assert from_pth.keys() == from_safetensors.keys() and "last_layer_style" in from_pth
    encoder = CsdEncoder.from_checkpoint(tmp_path / "checkpoint.pth")
    torch.testing.assert_close(encoder.embed_images(images()), CsdEncoder.from_checkpoint(path).embed_images(images()))


@pytest.mark.parametrize("kind", ["missing", "not_csd", "pickle_code"])
def test_bad_csd_checkpoints_are_one_line_errors(tmp_path, kind):
    path = tmp_path / "bad.pth"
    if kind == "not_csd":
        save_file({"weight": torch.zeros(2)}, path := tmp_path / "bad.safetensors")
    elif kind == "pickle_code":
        torch.save({"model_state_dict": {}, "hook": print}, path)  # a callable: refused by weights_only
    with pytest.raises(MetricModelError) as err:
        CsdEncoder.from_checkpoint(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def save_tiny_vit(path, kind: str) -> torch.nn.Module:
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(1)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                  patch_size=8)
    model = ViTModel(ViTConfig(**common), add_pooling_layer=False) if kind == "vit" else Dinov2Model(
        Dinov2Config(**common))
    model.save_pretrained(path)
    return model.eval()


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_dino_leakage_is_the_cosine_of_class_tokens(tmp_path, kind):
    model = save_tiny_vit(tmp_path / kind, kind)
    encoder = DinoEncoder.from_pretrained(tmp_path / kind)
    generated, references = images(), images()[1:] + images()[:1]
    pixels_g = encoder.processor(generated, return_tensors="pt").pixel_values
    pixels_r = encoder.processor(references, return_tensors="pt").pixel_values
    assert pixels_g.shape[-2:] == (32, 32)
    with torch.no_grad():
        g, r = model(pixels_g).last_hidden_state[:, 0], model(pixels_r).last_hidden_state[:, 0]
    torch.testing.assert_close(encoder.embed_images(generated), g)
    score = dino_content_leakage(encoder.embed_images(generated), encoder.embed_images(references))
    assert score.tolist() == pytest.approx(hand_cosines(g, r), abs=1e-5)


def test_dino_folder_errors_are_one_line(tmp_path):
    with pytest.raises(MetricModelError, match="DINO model folder not found"):
        DinoEncoder.from_pretrained(tmp_path / "missing")
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=16)).save_pretrained(tmp_path / "clip")
    with pytest.raises(MetricModelError, match="'clip_vision_model' model; DINO needs"):
        DinoEncoder.from_pretrained(tmp_path / "clip")
