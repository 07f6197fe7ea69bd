"""The field's style and content metrics, as options: CSD style similarity and DINO content leakage.

- CSD (Somepalli et al., "Measuring Style Similarity in Diffusion Models", 2024): a CLIP ViT-L/14
  vision tower fine-tuned for style, whose class-token feature (after ``ln_post``) goes through a
  linear style head and is L2-normalised. Style similarity = cosine of generated vs reference.
- DINO (ViT or DINOv2): cosine of the final class tokens of generated vs reference. DINO features
  follow objects and layout rather than style, so a high value means the reference's content
  leaked into the image.

CSD checkpoint layout (the public release's ``checkpoint.pth``): a training checkpoint
``{"model_state_dict": {...}, "opt_bb", "opt_proj", "iter", "args", "fp16_scaler"}``, or the bare
state dict, as ``.pth``/``.pt``/``.bin`` (read with ``torch.load(weights_only=True)``) or
``.safetensors``. State-dict keys may carry DDP's ``module.`` prefix and are:

- ``backbone.*``: OpenAI-CLIP ``VisionTransformer`` names (``conv1.weight``, ``class_embedding``,
  ``positional_embedding``, ``ln_pre.*``, ``transformer.resblocks.{i}.{ln_1,attn,ln_2,mlp.c_fc,
  mlp.c_proj}.*``, ``ln_post.*``; ``proj`` removed);
- ``last_layer_style``: the (width, dim) style head; ``last_layer_content`` is ignored.

The backbone is loaded into transformers' ``CLIPVisionModel`` (same architecture, QuickGELU),
with its shape read from the weights.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    BitImageProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Model,
    ViTImageProcessor,
    ViTModel,
)

from .errors import GenerationError
from .metrics import paired_cosine

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MetricModelError(GenerationError):
    """A metric model (CSD checkpoint, DINO folder) that is missing or not of the expected layout."""


def csd_style_similarity(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Cosine of CSD style vectors of each generated image and its reference (higher = same style)."""
    return paired_cosine(generated, references)


def dino_content_leakage(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Cosine of DINO class tokens of each generated image and its reference (lower = less content copied)."""
    return paired_cosine(generated, references)


class ImageEncoder:
    """Batched image features from a model and its preprocessing; subclasses say which feature."""

    def __init__(self, model: torch.nn.Module, processor, batch_size: int = 16) -> None:
        self.model, self.processor, self.batch_size = model.eval(), processor, batch_size

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, D) features of preprocessed pixels."""
        raise NotImplementedError

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, D) features, float32 on CPU."""
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            pixels = self.processor(batch, return_tensors="pt").pixel_values
            chunks.append(self.features(pixels.to(self.model.device, self.model.dtype)).float().cpu())
        return torch.cat(chunks)


class CsdEncoder(ImageEncoder):
    """CSD style vectors: L2-normalised ``ln_post(class token) @ last_layer_style``."""

    def __init__(self, model: CLIPVisionModel, style_head: torch.Tensor, processor, batch_size: int = 16) -> None:
        super().__init__(model, processor, batch_size)
        self.style_head = style_head.to(model.device, model.dtype)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Style vectors of preprocessed pixels."""
        return F.normalize(self.model(pixel_values).pooler_output @ self.style_head, dim=-1)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu",
                        num_heads: int | None = None) -> CsdEncoder:
        """Load a CSD checkpoint (layout in the module docstring); heads default to OpenAI's width // 64."""
        state = read_csd_state(path)
        config = csd_vision_config(state, num_heads)
        model = CLIPVisionModel(config)
        load_openai_backbone(model, {k.removeprefix("backbone."): v for k, v in state.items()
                                     if k.startswith("backbone.")})
        size = config.image_size
        # CSD's own transform: bicubic resize of the short side, centre crop, CLIP mean/std.
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return cls(model.to(device), state["last_layer_style"].float(), processor)


class DinoEncoder(ImageEncoder):
    """DINO / DINOv2 class tokens (``last_hidden_state[:, 0]``, after the final layer norm)."""

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class tokens of preprocessed pixels."""
        return self.model(pixel_values).last_hidden_state[:, 0]

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> DinoEncoder:
        """A transformers ``ViTModel`` (DINO v1) or ``Dinov2Model`` folder, with its preprocessing if saved."""
        if not Path(path).is_dir():
            raise MetricModelError(f"DINO model folder not found: {path}")
        config = AutoConfig.from_pretrained(path)
        if config.model_type == "vit":
            model = ViTModel.from_pretrained(path, add_pooling_layer=False)
            default = ViTImageProcessor
        elif config.model_type == "dinov2":
            model, default = Dinov2Model.from_pretrained(path), BitImageProcessor
        else:
            raise MetricModelError(f"{path} holds a {config.model_type!r} model; DINO needs 'vit' or 'dinov2'")
        try:
            processor = AutoImageProcessor.from_pretrained(path)
        except OSError:  # a bare model folder: ImageNet preprocessing at the model's size
            size = config.image_size
            processor = default(size={"height": size, "width": size}, do_center_crop=False,
                                image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        return cls(model.to(device), processor)


def read_csd_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The CSD model's state dict from a checkpoint file, without ``module.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise MetricModelError(f"CSD checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        raw = load_file(path)
    else:
        # The public training checkpoint stores its argparse namespace next to the weights.
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling reports many error types; all mean "not a safe checkpoint"
            raise MetricModelError(f"cannot read CSD checkpoint {path} as weights only: "
                                   f"{str(err).splitlines()[0]}") from err
    state = raw.get("model_state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise MetricModelError(f"{path} is not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "last_layer_style" not in state or "backbone.conv1.weight" not in state:
        raise MetricModelError(f"{path} is not a CSD checkpoint: expected 'backbone.*' and 'last_layer_style' keys")
    return state


def csd_vision_config(state: dict[str, torch.Tensor], num_heads: int | None = None) -> CLIPVisionConfig:
    """The CLIP vision config the backbone weights imply (ViT-L/14 for the public checkpoint)."""
    width, _, patch, _ = state["backbone.conv1.weight"].shape
    grid = math.isqrt(state["backbone.positional_embedding"].shape[0] - 1)
    layers = len({k.split(".")[3] for k in state if k.startswith("backbone.transformer.resblocks.")})
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=state["backbone.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=num_heads or max(1, width // 64),
        image_size=grid * patch, patch_size=patch, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def openai_to_hf_vision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI-CLIP ``VisionTransformer`` weights under ``CLIPVisionModel``'s names (without its prefix)."""
    out = {"embeddings.patch_embedding.weight": state["conv1.weight"],
           "embeddings.class_embedding": state["class_embedding"],
           "embeddings.position_embedding.weight": state["positional_embedding"]}
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        out[f"{ours}.weight"], out[f"{ours}.bias"] = state[f"{theirs}.weight"], state[f"{theirs}.bias"]
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
               "attn.out_proj": "self_attn.out_proj"}
    for key, value in state.items():
        if not key.startswith("transformer.resblocks."):
            continue
        index, rest = key.split(".", 3)[2:]
        name, param = rest.rsplit(".", 1)
        target = f"encoder.layers.{index}"
        if name == "attn" and param in ("in_proj_weight", "in_proj_bias"):
            # nn.MultiheadAttention packs query, key and value in this order along the output dim.
            kind = param.removeprefix("in_proj_")
            for proj, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{target}.self_attn.{proj}.{kind}"] = chunk
        elif name in renames:
            out[f"{target}.{renames[name]}.{param}"] = value
        else:
            raise MetricModelError(f"unexpected CSD backbone weight {key!r}")
    return out


def load_openai_backbone(model: CLIPVisionModel, state: dict[str, torch.Tensor]) -> None:
    """Copy OpenAI-CLIP vision weights into ``model``; any missing or extra weight is an error."""
    # transformers 4 nests the tower under ``vision_model.``, transformers 5 does not; read it off the model.
    prefix = next(k for k in model.state_dict() if k.endswith("post_layernorm.weight")).removesuffix(
        "post_layernorm.weight")
    try:
        converted = {prefix + k: v.float() for k, v in openai_to_hf_vision(state).items()}
    except KeyError as err:
        raise MetricModelError(f"CSD backbone lacks weight {err}") from err
    expected = {k for k in model.state_dict() if not k.endswith("position_ids")}
    missing, extra = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or extra:
        raise MetricModelError(f"CSD backbone does not fit a CLIP vision tower: missing {missing[:3]}, "
                               f"unexpected {extra[:3]}")
    try:
        model.load_state_dict(converted, strict=False)
    except RuntimeError as err:
        raise MetricModelError(f"CSD backbone shapes do not fit: {str(err).splitlines()[-1].strip()}") from err
