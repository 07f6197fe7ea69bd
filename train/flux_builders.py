"""``model=flux``: the FLUX base builder, its adapter, its config checks and its checkpoint export.

The counterpart of ``train.builders`` (SDXL/SD 1.5) for FLUX.1 style-block IP-Adapters. The
adapter is ``instantstyle.flux``'s: an image branch on the chosen double-stream blocks only,
exported in the XLabs layout that stock ``FluxPipeline.load_ip_adapter`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from instantstyle.flux_blocks import flux_block_indices, flux_block_name, resolve_flux_blocks
from train.config import BlocksConfig, ConfigError, ModelConfig, section

if TYPE_CHECKING:
    from train.checks import Settings

FLUX_BUILDER = "train.flux_builders.build_flux_base"  # the model group's _target_ that means "a FLUX base"
NO_RESAMPLER = "0"  # checkpoint identities name a resampler width; FLUX adapters have none


def is_flux(model: ModelConfig) -> bool:
    """True when the ``model`` group builds a FLUX base (its ``_target_`` is this module's builder)."""
    return model._target_ == FLUX_BUILDER


def build_flux_base(path: str, *, image_encoder: str | None = None, check_content_space: bool = False,
                    build_if_missing: bool = False, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", encoders: bool = True, hub_id: str | None = None,
                    quantize: str = "none"):
    """Load the frozen FLUX base (the ``model`` group's builder); the tiny FLUX base is made on first use.

    ``hub_id`` is only recorded by exports (train/record.py). ``quantize``: the transformer's and T5's
    linear weights in int8, fp8 or NF4 (``instantstyle.quantize``).
    """
    from instantstyle.flux_models import load_flux_base
    from instantstyle.quantize import QuantizationError, quantize_frozen, require_quantization

    del check_content_space  # FLUX has no shared text-image space; check_flux_config refuses true
    try:
        require_quantization(quantize, device, dtype)
    except QuantizationError as err:
        raise ConfigError(str(err)) from None
    if build_if_missing and not Path(path, "transformer").is_dir():
        from data_tools.make_tiny_flux import save_tiny_flux

        save_tiny_flux(path)
    base = load_flux_base(path, image_encoder=image_encoder, dtype=dtype, device=device, encoders=encoders)
    quantize_frozen(base.transformer, quantize)
    if encoders:  # T5-XXL is the other 9 GiB; from an embedding cache it is a config-only meta module
        quantize_frozen(base.pipe.text_encoder_2, quantize)
    return base


def flux_target_blocks(blocks: Any) -> list[str]:
    """Canonical ``double_blocks.{i}`` names (or ``["all"]``) for the ``blocks`` group; custom targets win."""
    from instantstyle.blocks import UnknownBlockError

    blocks = section(blocks, "blocks", BlocksConfig)
    try:
        return resolve_flux_blocks(list(blocks.targets) if blocks.targets else blocks.preset)
    except UnknownBlockError as err:
        raise ConfigError(str(err)) from None


def meta_flux_transformer(path: str):
    """The base's FLUX transformer built on the meta device from its config: its shape, no weights."""
    from diffusers import FluxTransformer2DModel

    config = FluxTransformer2DModel.load_config(path, subfolder="transformer")
    with torch.device("meta"):
        return FluxTransformer2DModel.from_config(config)


def chosen_double_blocks(transformer, blocks: list[str], num_tokens: int) -> list[int]:
    """Validated indices of ``blocks`` on ``transformer``; one-line ``ConfigError`` for a bad index or token count."""
    from instantstyle.flux import check_stock_loadable, resolve_double_blocks

    try:
        check_stock_loadable(num_tokens, transformer.config.joint_attention_dim)
    except ValueError as err:
        raise ConfigError(f"adapter.{err}") from None  # the message starts "num_tokens=N ..."
    try:
        return resolve_double_blocks(transformer, flux_block_indices(blocks))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_flux_options(settings: Settings) -> None:
    """Settings that mean nothing (or are not built) for a FLUX base: one line each."""
    adapter, trainer = settings.adapter, settings.trainer
    refusals = [
        (adapter.type != "ip_adapter", f"adapter.type={adapter.type} is not available for model=flux: "
         "the stock FLUX IP-Adapter format has no resampler; use adapter=ip_adapter"),
        (settings.model.check_content_space, "model=flux has no shared text-image space (its CLIP text encoder has "
         "no projection), so content subtraction is unavailable; set model.check_content_space=false"),
        (trainer.content_scale != 0, "trainer.content_scale needs a shared text-image space, which model=flux "
         "lacks; set trainer.content_scale=0"),
        (trainer.snr_gamma is not None, "trainer.snr_gamma weights a noise-prediction loss; FLUX's rectified-flow "
         "loss is unweighted: set trainer.snr_gamma=null"),
        (trainer.noise_offset != 0, "trainer.noise_offset is not implemented for model=flux; set trainer.noise_offset=0"),
        (settings.validation.styles is not None, "validation generation is not wired for model=flux yet; set "
         "validation.styles=null (trainer.validate_every still logs a fixed-batch loss)"),
    ]
    for refused, message in refusals:
        if refused:
            raise ConfigError(message)


def check_flux_model(model: ModelConfig, blocks: BlocksConfig, num_tokens: int) -> tuple[str, list[str] | None]:
    """The FLUX base exists, the target blocks exist in it, the image encoder reads; ("flux", blocks)."""
    from transformers import CLIPVisionConfig

    from instantstyle.models import BaseModelError, resolve_image_encoder
    from train.builders import unreadable_base

    names = flux_target_blocks(blocks)
    if model.build_if_missing and not Path(model.path, "transformer").is_dir():
        return "flux", None  # the tiny FLUX base is built on first use; its blocks are checked then
    try:
        transformer = meta_flux_transformer(model.path)
        enc_path, enc_sub = resolve_image_encoder(model.path, model.image_encoder)
        CLIPVisionConfig.from_pretrained(enc_path, **({"subfolder": enc_sub} if enc_sub else {}))
    except BaseModelError as err:
        raise ConfigError(str(err)) from err
    except (OSError, ValueError) as err:
        raise unreadable_base(model.path, model.image_encoder, "FLUX base", err) from err
    return "flux", [flux_block_name(i) for i in chosen_double_blocks(transformer, names, num_tokens)]


def check_flux_config(settings: Settings) -> tuple[str, list[str] | None]:
    """Everything ``check_config`` checks about the model when it is a FLUX base."""
    check_flux_options(settings)
    return check_flux_model(settings.model, settings.blocks, settings.adapter.num_tokens)


def build_flux_adapter(base, *, blocks: list[str], num_tokens: int, init_from: str | None = None):
    """A fresh adapter on the chosen double blocks (or initialised from an XLabs-layout file), fp32."""
    from instantstyle.flux import FluxAdapterSpec, install_flux_adapter

    transformer = base.transformer
    indices = chosen_double_blocks(transformer, blocks, num_tokens)
    extra = {"base_model": base.path, "image_encoder": base.image_encoder_path}
    spec = FluxAdapterSpec(tuple(indices), base.image_encoder.config.projection_dim, num_tokens, extra)
    adapter = install_flux_adapter(transformer, spec)
    if init_from:
        init_flux_adapter(adapter, transformer, init_from)
    return adapter.to(transformer.device, torch.float32)


def init_flux_adapter(adapter, transformer, path: str) -> None:
    """Start from a FLUX IP-Adapter file (ours or XLabs'): its projection and the chosen blocks' branches."""
    from instantstyle.errors import AdapterFileError
    from instantstyle.flux_export import check_flux_shapes, copy_flux_weights, read_flux_file

    try:
        tensors, _ = read_flux_file(path)
        check_flux_shapes(tensors, transformer, Path(path))
        copy_flux_weights(adapter, tensors)
    except (AdapterFileError, KeyError, RuntimeError) as err:
        raise ConfigError(f"adapter.init_from={path}: {str(err).splitlines()[0]}") from None


def flux_identity(adapter) -> dict[str, str]:
    """What a FLUX checkpoint holds, in the keys every checkpoint identity has (plus ``family``)."""
    spec = adapter.spec
    return {"family": "flux", "adapter_type": "ip_adapter",
            "target_blocks": json.dumps([flux_block_name(i) for i in adapter.block_indices]),
            "num_tokens": str(spec.num_tokens), "image_embed_dim": str(spec.image_embed_dim),
            "resampler_dim": NO_RESAMPLER, **{k: str(v) for k, v in spec.extra.items()}}


def flux_adapter_from_checkpoint(identity: dict, weights: dict, *, base_path: str, name: str):
    """(adapter, meta transformer) rebuilt from a FLUX checkpoint's identity and weights.

    Only the transformer's config is read (a meta-device model): the export needs its shapes,
    not 24 GB of frozen weights.
    """
    from instantstyle.flux import FluxAdapterSpec, install_flux_adapter
    from train.checkpoint import CheckpointError

    try:
        transformer = meta_flux_transformer(base_path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read the FLUX transformer config from {base_path} "
                              f"({str(err).splitlines()[0]}); pass --base PATH") from err
    try:
        indices = chosen_double_blocks(transformer, json.loads(identity["target_blocks"]), int(identity["num_tokens"]))
    except ConfigError as err:
        raise CheckpointError(f"{name} does not fit the base at {base_path}: {err}") from None
    spec = FluxAdapterSpec(tuple(indices), int(identity["image_embed_dim"]), int(identity["num_tokens"]))
    adapter = install_flux_adapter(transformer, spec).to_empty(device="cpu")
    try:
        adapter.load_state_dict(weights)
    except RuntimeError as err:
        lines = str(err).splitlines()
        raise CheckpointError(f"{name} does not fit the base at {base_path}: "
                              f"{lines[1].strip() if len(lines) > 1 else err}") from None
    return adapter, transformer
