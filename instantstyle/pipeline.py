"""Stock diffusers SDXL pipelines carrying an InstantStyle adapter.

Generation runs the unmodified ``StableDiffusionXLPipeline`` (or its ControlNet
variant) and hands it precomputed ``ip_adapter_image_embeds``, so our images and
those of a diffusers user who calls ``load_ip_adapter`` on our export come from the
same denoising code. The UNet carries either diffusers' own IP-Adapter processors
(loaded from an export) or, during training validation, our in-memory adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (
    ControlNetModel,
    EulerDiscreteScheduler,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import MultiIPAdapterImageProjection
from PIL import Image, UnidentifiedImageError
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from .adapter import AdapterSpec, InstantStyleAdapter
from .blocks import ALL_BLOCKS, UnknownBlockError, block_of, cross_attention_layers, resolve_blocks, select_layers
from .errors import AdapterFileError, GenerationError
from .export import check_shapes, complete_layers, read_adapter_file, spec_from_file
from .model_ids import is_hub_id, offline_download_hint, same_model
from .models import BaseModel, BaseModelError, model_family, resolve_image_encoder


def load_image(path: str | Path, what: str = "style image") -> Image.Image:
    """Open an image as RGB, or raise ``GenerationError`` saying why it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise GenerationError(f"{what} not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise GenerationError(f"cannot read {what} {path}: {str(err).splitlines()[0]}") from err


def feature_extractor_for(image_encoder: CLIPVisionModelWithProjection) -> CLIPImageProcessor:
    """The CLIP preprocessing diffusers' ``load_ip_adapter`` builds when a pipeline has none."""
    size = image_encoder.config.image_size
    return CLIPImageProcessor(size=size, crop_size=size)


def _load_image_encoder(base: str, image_encoder: str | None, dtype: torch.dtype) -> CLIPVisionModelWithProjection:
    repo, sub = resolve_image_encoder(base, image_encoder)
    kwargs = {"subfolder": sub} if sub else {}
    try:
        return CLIPVisionModelWithProjection.from_pretrained(repo, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        raise BaseModelError(f"cannot load image encoder {repo}: {str(err).splitlines()[0]}") from err


def load_pipeline(base: str, *, image_encoder: str | None = None, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu",
                  controlnet: str | ControlNetModel | None = None) -> StableDiffusionXLPipeline:
    """Stock SDXL pipeline (ControlNet variant when ``controlnet`` is given) with an image encoder."""
    encoder = _load_image_encoder(base, image_encoder, dtype)
    kwargs = {"image_encoder": encoder, "dtype": dtype}
    try:
        if controlnet is None:
            pipe = StableDiffusionXLPipeline.from_pretrained(base, **kwargs)
        else:
            if not isinstance(controlnet, ControlNetModel):
                controlnet = ControlNetModel.from_pretrained(controlnet, dtype=dtype)
            pipe = StableDiffusionXLControlNetPipeline.from_pretrained(base, controlnet=controlnet, **kwargs)
    except (OSError, ValueError) as err:
        raise BaseModelError(f"cannot load SDXL pipeline from {base}: {str(err).splitlines()[0]}") from err
    if pipe.feature_extractor is None:
        pipe.register_modules(feature_extractor=feature_extractor_for(encoder))
    return pipe.to(device)


def pipeline_from_base(base: BaseModel) -> StableDiffusionXLPipeline:
    """A stock pipeline that shares the frozen modules of a loaded base (no copies, no reload)."""
    # The base keeps a DDPM scheduler for training; sample with SDXL's default (Euler).
    scheduler = EulerDiscreteScheduler.from_config(base.noise_scheduler.config)
    return StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=scheduler,
        image_encoder=base.image_encoder, feature_extractor=feature_extractor_for(base.image_encoder),
    )


def read_checked_adapter(path: str | Path, unet: UNet2DConditionModel) -> tuple[dict, AdapterSpec]:
    """Tensors (nested as diffusers expects) and spec of an adapter file that fits ``unet``."""
    path = Path(path)
    tensors, metadata = read_adapter_file(path)
    tensors = complete_layers(tensors, metadata, unet, path)
    spec = spec_from_file(tensors, metadata, unet.config.cross_attention_dim, path)
    # diffusers needs every cross-attention layer's weights, trained or not.
    everything = AdapterSpec(spec.adapter_type, ALL_BLOCKS, spec.image_embed_dim, spec.num_tokens, spec.resampler_dim)
    check_shapes(tensors, unet, everything, path)
    nested = {group: {k.removeprefix(group + "."): v for k, v in tensors.items() if k.startswith(group + ".")}
              for group in ("image_proj", "ip_adapter")}
    return nested, spec


def load_ip_weights(pipe: StableDiffusionXLPipeline, path: str | Path) -> AdapterSpec:
    """Load an adapter file into diffusers' IP-Adapter processors; returns its spec."""
    nested, spec = read_checked_adapter(path, pipe.unet)
    if getattr(pipe.unet, "encoder_hid_proj", None) is not None:
        # unload_ip_adapter also drops the image encoder, which we keep.
        encoder, extractor = pipe.image_encoder, pipe.feature_extractor
        pipe.unload_ip_adapter()
        pipe.register_modules(image_encoder=encoder, feature_extractor=extractor)
    with _without_empty_fp32_notice():
        pipe.load_ip_adapter(nested, subfolder="", weight_name="", image_encoder_folder=None)
    return spec


class _EmptyFp32Notice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


@contextmanager
def _without_empty_fp32_notice() -> Iterator[None]:
    # load_ip_adapter re-casts the UNet to its own dtype, and diffusers warns about the modules it
    # must keep in float32 even when there are none: a false alarm on every load, so drop just that.
    logger, notice = logging.getLogger("diffusers.models.modeling_utils"), _EmptyFp32Notice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def target_layers(unet: UNet2DConditionModel, blocks: Sequence[str]) -> list[str]:
    """Cross-attention layers of ``blocks``; ``UnknownBlockError`` lists valid blocks."""
    return select_layers(list(unet.attn_processors.keys()), list(blocks))


def set_layer_scales(unet: UNet2DConditionModel, blocks: Sequence[str], scale: float) -> None:
    """Scale ``scale`` on the layers of ``blocks`` and exactly 0 (skipped by diffusers) elsewhere."""
    targets = set(target_layers(unet, blocks))
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, IPAdapterAttnProcessor2_0):
            proc.scale = [float(scale) if name in targets else 0.0] * len(proc.scale)


def diffusers_scale_dict(unet: UNet2DConditionModel, blocks: Sequence[str],
                         scale: float = 1.0) -> float | dict:
    """The ``set_ip_adapter_scale`` argument equal to injecting ``scale`` into ``blocks`` only.

    ``["up_blocks.0.attentions.1"]`` -> ``{"up": {"block_0": [0.0, s, 0.0]}}``; whole blocks
    (``up_blocks.0``) become ``{"up": {"block_0": s}}``, the mid block ``{"mid": s}``.
    """
    if tuple(blocks) == ALL_BLOCKS:
        return float(scale)
    layers = target_layers(unet, blocks)
    result: dict = {}
    for block in dict.fromkeys(block_of(layer) for layer in layers):
        parts = block.split(".")
        if parts[0] == "mid_block":
            result["mid"] = float(scale)
            continue
        side, index, position = parts[0].removesuffix("_blocks"), int(parts[1]), int(parts[3])
        count = len(getattr(unet, parts[0])[index].attentions)
        entry = result.setdefault(side, {}).setdefault(f"block_{index}", [0.0] * count)
        entry[position] = float(scale)
    _check_whole_blocks(unet, layers)
    return result


def _check_whole_blocks(unet: UNet2DConditionModel, layers: list[str]) -> None:
    # diffusers scales whole attention blocks; a finer prefix cannot be written as its dict.
    chosen = set(layers)
    for layer in cross_attention_layers(unet.attn_processors.keys()):
        if layer not in chosen and block_of(layer) in {block_of(x) for x in chosen}:
            raise UnknownBlockError(f"{block_of(layer)} is only partly selected; set_ip_adapter_scale "
                                    "works on whole attention blocks")


class TokenProjection(nn.Module):
    """Our adapter's image projection as diffusers' UNet calls it (casts to the adapter's dtype)."""

    def __init__(self, adapter: InstantStyleAdapter) -> None:
        super().__init__()
        self.adapter = adapter

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.adapter.image_tokens(image_embeds)


@contextmanager
def attached_adapter(unet: UNet2DConditionModel, adapter: InstantStyleAdapter) -> Iterator[None]:
    """Let the stock pipeline feed image tokens to our processors; restores the UNet afterwards."""
    old_proj, old_type = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
    # The same two attributes diffusers' load_ip_adapter sets; restored so training is untouched.
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([TokenProjection(adapter)])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    try:
        yield
    finally:
        unet.encoder_hid_proj = old_proj
        unet.config.encoder_hid_dim_type = old_type


def meta_unet(base: str) -> UNet2DConditionModel:
    """The base's UNet built from its config on the meta device: names and shapes, no weights."""
    try:
        config = UNet2DConditionModel.load_config(base, subfolder="unet")
    except (OSError, ValueError) as err:
        raise BaseModelError(f"cannot read the UNet config of {base}: {str(err).splitlines()[0]}"
                             + offline_download_hint(base)) from err
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def preflight(base: str, adapter: str | Path, blocks: str | Sequence[str] | None) -> None:
    """Check that the adapter fits the base and the blocks exist before loading any weights."""
    path = Path(adapter)
    # The whole file, not just its header: NaN or integer weights must fail before the base loads.
    tensors, metadata = read_adapter_file(path)
    unet = meta_unet(base)
    try:
        tensors = complete_layers(tensors, metadata, unet, path)
    except AdapterFileError as err:
        raise AdapterFileError(f"{err}{trained_for(metadata, base)}") from err
    spec = spec_from_file(tensors, metadata, unet.config.cross_attention_dim, path)
    everything = AdapterSpec(spec.adapter_type, ALL_BLOCKS, spec.image_embed_dim, spec.num_tokens, spec.resampler_dim)
    try:
        check_shapes(tensors, unet, everything, path)
    except AdapterFileError as err:
        raise AdapterFileError(f"{err}{trained_for(metadata, base)}") from err
    target_layers(unet, spec.blocks if blocks is None else resolve_blocks(blocks, model_family(unet)))


def trained_for(metadata: dict[str, str], base: str) -> str:
    """``"; it was trained for X"`` when the file names a base model other than ``base``, else ""."""
    trained = metadata.get("base_model", "")
    if not trained or same_model(trained, base):
        return ""
    hint = f" (pass --base {trained})" if is_hub_id(trained) else " (a folder of that name and config hash)"
    return f"; it was trained for {trained}{hint}"
