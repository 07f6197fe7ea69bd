"""Builders of the ``model`` and ``adapter`` config groups (their ``_target_``s)."""

from __future__ import annotations

from pathlib import Path

import torch

from instantstyle.adapter import AdapterSpec, InstantStyleAdapter, install_adapter
from instantstyle.export import load_adapter
from instantstyle.models import PACKAGE_ROOT, BaseModel, load_base, locate_base, looks_local
from train.config import ConfigError

def resolve_model_path(path: str, *, must_exist: bool = True) -> str:
    """``model.path`` as given when it exists here or is a hub id; else a relative path from the package root.

    So ``model=toy`` (``data_tools/toy_base``, committed) works from any folder. A missing local-looking
    path is one line, never a hub request.
    """
    found = locate_base(path)
    if must_exist and looks_local(path) and not Path(found).exists():
        raise ConfigError(f"model.path={path}: no such folder (looked here and in {PACKAGE_ROOT})")
    return found  # a folder, a hub id, or the tiny base to build there


def unreadable_base(model_path: str, image_encoder: str | None, what: str, err: Exception) -> ConfigError:
    """One line for a base that cannot be read; offline, it names the hub ids to download first."""
    from instantstyle.model_ids import offline_download_hint

    reason = (str(err).splitlines() or [type(err).__name__])[0]
    return ConfigError(f"model.path={model_path}: cannot read the {what} ({reason})"
                       + offline_download_hint(model_path, image_encoder))


def build_base(path: str, *, image_encoder: str | None = None, check_content_space: bool = True,
               build_if_missing: bool = False, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", encoders: bool = True, hub_id: str | None = None,
               quantize: str = "none") -> BaseModel:
    """Load the frozen base (the ``model`` group's builder); the tiny base is made on first use.

    ``encoders=False``: UNet and scheduler weights only (training from an embedding cache). ``hub_id`` is
    only recorded by exports (train/record.py). ``quantize``: the UNet's linear weights in int8, fp8 or
    NF4 (``instantstyle.quantize``).
    """
    from instantstyle.quantize import QuantizationError, quantize_frozen, require_quantization

    try:
        require_quantization(quantize, device, dtype)
    except QuantizationError as err:
        raise ConfigError(str(err)) from None
    path = resolve_model_path(path, must_exist=not build_if_missing)
    if build_if_missing and not Path(path, "unet").is_dir():
        from data_tools.make_tiny_model import save_tiny_model

        save_tiny_model(path)
    base = load_base(path, image_encoder=image_encoder, dtype=dtype, device=device,
                     check_content=check_content_space, encoders=encoders)
    quantize_frozen(base.unet, quantize)
    return base


def adapter_spec(base: BaseModel, *, type: str, num_tokens: int, resampler_dim: int,
                 blocks: list[str] | None) -> AdapterSpec:
    """What to train on this base: image feature width comes from the image encoder."""
    enc = base.image_encoder.config
    embed_dim = enc.hidden_size if type == "ip_adapter_plus" else enc.projection_dim
    extra = {"base_model": base.path, "image_encoder": base.image_encoder_path}
    return AdapterSpec(type, tuple(blocks), embed_dim, num_tokens,
                       resampler_dim, extra)


def build_adapter(base: BaseModel, *, blocks: list[str] | None, type: str, num_tokens: int,
                  resampler_dim: int, init_from: str | None = None) -> InstantStyleAdapter:
    """Install a fresh adapter (or one initialised from a file) on the base UNet (the ``adapter`` group)."""
    if base.family == "flux":  # FLUX: image branches on double-stream blocks (train/flux_builders.py)
        from train.flux_builders import build_flux_adapter

        return build_flux_adapter(base, blocks=blocks, num_tokens=num_tokens, init_from=init_from)
    spec = adapter_spec(base, type=type, num_tokens=num_tokens, resampler_dim=resampler_dim, blocks=blocks)
    adapter = init_adapter(base, spec, init_from) if init_from else install_adapter(base.unet, spec)
    return adapter.to(base.unet.device, torch.float32)


def init_adapter(base: BaseModel, spec: AdapterSpec, path: str) -> InstantStyleAdapter:
    """Start from an adapter file (ours, or a released one in diffusers' / ComfyUI's layout, flat .safetensors
    or nested .bin): its projection and the chosen blocks' layers; every other layer gets no branch.

    The file must be the adapter the config describes: a one-line ``ConfigError`` names what differs.
    """
    from instantstyle.errors import AdapterFileError

    try:
        adapter = load_adapter(path, base.unet, blocks=spec.blocks)
    except AdapterFileError as err:
        raise ConfigError(f"adapter.init_from={path}: {str(err).splitlines()[0]}") from None
    found = adapter.spec
    plus = spec.adapter_type == "ip_adapter_plus"
    for what, want, got, fix in [
            ("type", spec.adapter_type, found.adapter_type, f"adapter={found.adapter_type}"),
            ("image tokens", spec.num_tokens, found.num_tokens, f"adapter.num_tokens={found.num_tokens}"),
            ("resampler width", spec.resampler_dim if plus else None, found.resampler_dim if plus else None,
             f"adapter.resampler_dim={found.resampler_dim}"),
            ("image feature width", spec.image_embed_dim, found.image_embed_dim,
             "model.image_encoder to the encoder the file was trained with")]:
        if want != got:
            raise ConfigError(f"adapter.init_from={path}: the file's {what} is {got}, the config's {want}; set {fix}")
    adapter.spec = spec  # the file's weights under this run's provenance
    return adapter
