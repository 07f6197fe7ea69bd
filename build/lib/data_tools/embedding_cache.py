"""The embedding-cache format, in one place: what `data_tools.precompute` writes and `data=cached` reads.

A cache is a folder of WebDataset shards (same names as the source shards) plus `manifest.json`
(`data_tools.shards`' manifest: per-shard counts, so the training split stays even) whose
`options["cache"]` names what made it, and `empty_prompt.safetensors` (the empty caption's
embeddings, for text dropout). Each sample holds:

- `KEY.safetensors`: `latent_mean`, `latent_std` (the VAE's latent distribution, not one draw:
  training samples mean + std·ε anew each epoch, keeping the regularising noise the live VAE adds),
  `prompt_embeds` (both text encoders' penultimate hidden states, concatenated as the UNet takes
  them), `pooled_prompt_embeds` (SDXL), `image_features` (`image_embeds`, or the penultimate hidden
  states for ip_adapter_plus), and with `--reference-views K` also `image_feature_views` (K, …): the
  image encoder's outputs for K augmented references (`instantstyle.augment`), one of which training
  draws per sample and epoch when the data config turns reference augmentation on;
- `KEY.json`: original_size, crop_top_left, target_size (SDXL conditioning), caption;
- `KEY.txt`: the caption.
Safetensors bytes hold only tensors: loading them can never run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from data_tools.shards import BadSample, read_manifest

CACHE_FORMAT = "instantstyle-embedding-cache"
CACHE_VERSION = 1
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
TENSOR_KEYS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds", "image_features")
VIEWS_KEY = "image_feature_views"
# Identity entries that must match the training config; the rest (dtype, batch size) are informative.
IDENTITY_KEYS = ("base_model", "image_encoder", "adapter_type", "resolution", "buckets", "clip_image_size",
                 "clip_mean", "clip_std")


def cache_identity(*, base_model: str, image_encoder: str, adapter_type: str, resolution: int, buckets: Any,
                   clip_image_size: int, clip_mean, clip_std, dtype: str, encode_batch_size: int,
                   scaling_factor: float, reference: dict | None = None) -> dict:
    """The manifest's `options["cache"]`: what a cache was made from and how (``reference``: its augmented views)."""
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "base_model": base_model, "reference": reference,
            "image_encoder": image_encoder, "adapter_type": adapter_type, "resolution": resolution,
            "buckets": buckets, "clip_image_size": clip_image_size, "clip_mean": [float(v) for v in clip_mean],
            "clip_std": [float(v) for v in clip_std], "dtype": dtype, "encode_batch_size": encode_batch_size,
            "scaling_factor": scaling_factor, "empty_prompt": EMPTY_PROMPT_FILE}


def source_id(path: str) -> str:
    """A model source as the identity records it: local folders absolute ("REPO:SUB" keeps its subfolder)."""
    repo, sep, sub = path.partition(":") if not os.path.exists(path) else (path, "", "")
    if os.path.exists(repo):
        repo = os.path.abspath(repo)
    return f"{repo}{sep}{sub}"


def read_identity(folder: str | Path) -> dict | None:
    """The cache identity in `folder/manifest.json`, or None when the folder holds no embedding cache."""
    manifest = read_manifest(Path(folder))
    if manifest is None:
        return None
    identity = manifest.options.get("cache")
    return identity if isinstance(identity, dict) and identity.get("format") == CACHE_FORMAT else None


def identity_mismatch(found: dict, wanted: dict) -> str | None:
    """'resolution: cache 512, config 1024' for the first identity entry that differs, else None."""
    for key in IDENTITY_KEYS:
        if _normal(found.get(key)) != _normal(wanted.get(key)):
            return f"{key}: cache {found.get(key)!r}, config {wanted.get(key)!r}"
    return None


def _normal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return round(value, 6) if isinstance(value, float) else value


def encode_sample(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, bytes]:
    """One cached sample's members (safetensors, JSON, caption)."""
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return {"safetensors": save_tensors(contiguous), "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
            "txt": meta["caption"].encode("utf-8")}


def decode_sample(members: dict[str, bytes]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of one cached sample; BadSample when a member is missing or broken."""
    if "safetensors" not in members or "json" not in members:
        raise BadSample("not a cached sample", "no .safetensors/.json member (data=cached needs a precomputed cache)")
    try:
        tensors = load_tensors(members["safetensors"])
        meta = json.loads(members["json"].decode("utf-8"))
    except (ValueError, RuntimeError, UnicodeDecodeError) as error:  # safetensors raises these on bad bytes
        raise BadSample("bad cached sample", str(error).splitlines()[0]) from None
    return tensors, meta


def save_empty_prompt(folder: Path, prompt_embeds: torch.Tensor, pooled: torch.Tensor | None) -> None:
    """Write the empty caption's (prompt_embeds, pooled) once per cache."""
    from data_tools.shards import write_atomic

    tensors = {"prompt_embeds": prompt_embeds.detach().cpu().contiguous()}
    if pooled is not None:
        tensors["pooled_prompt_embeds"] = pooled.detach().cpu().contiguous()
    write_atomic(folder / EMPTY_PROMPT_FILE, save_tensors(tensors))


def load_empty_prompt(folder: str | Path) -> dict[str, torch.Tensor]:
    """The empty caption's embeddings of the cache in `folder`."""
    return load_tensors((Path(folder) / EMPTY_PROMPT_FILE).read_bytes())
