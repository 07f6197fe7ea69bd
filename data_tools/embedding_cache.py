"""The embedding-cache format, in one place: what `data_tools.precompute` writes and `data=cached` reads.

A cache is a folder of WebDataset shards (same names as the source shards) plus `manifest.json`
(`data_tools.shards`' manifest: per-shard counts, so the training split stays even) whose
`options["cache"]` names what made it (the base family among it: FLUX latents are stored unpacked and
packed at training time, as the live task packs them), and `empty_prompt.safetensors` (the empty caption's
embeddings, for text dropout). Each sample holds:

- `KEY.safetensors`: `latent_mean`, `latent_std` (the VAE's latent distribution, not one draw:
  training samples mean + std·ε anew each epoch, keeping the regularising noise the live VAE adds),
  `prompt_embeds` (both text encoders' penultimate hidden states, concatenated as the UNet takes
  them; FLUX: the T5 sequence at the identity's `max_sequence_length`), `pooled_prompt_embeds` (SDXL;
  FLUX: CLIP's pooled embedding), `image_features` (`image_embeds`, or the penultimate hidden
  states for ip_adapter_plus), and with `--reference-views K` also `image_feature_views` (K, …): the
  image encoder's outputs for K augmented references (`instantstyle.augment`), one of which training
  draws per sample and epoch when the data config turns reference augmentation on;
- `KEY.json`: original_size, crop_top_left, target_size (SDXL conditioning), caption;
- `KEY.txt`: the caption.
Safetensors bytes hold only tensors: loading them can never run code. The identity also records every
tensor's shape (`shapes`), so `decode_sample` checks each sample against it and a bad one is skipped
and counted (`BadSample`) like a bad image, never stacked into a batch.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from data_tools.decode import MAX_SIDE, BadSample, decode_meta
from data_tools.shards import MANIFEST_NAME, Manifest, is_remote, manifest_from_json

CACHE_FORMAT = "instantstyle-embedding-cache"
CACHE_VERSION = 2  # 2: the identity records tensor shapes
EMPTY_PROMPT_FILE = "empty_prompt.safetensors"
TENSOR_KEYS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_prompt_embeds", "image_features")
VIEWS_KEY = "image_feature_views"
# Identity entries that must match the training config; the rest (dtype, batch size) are informative.
IDENTITY_KEYS = ("base_model", "image_encoder", "adapter_type", "resolution", "buckets", "clip_image_size",
                 "clip_mean", "clip_std", "max_sequence_length")


def cache_identity(*, base_model: str, image_encoder: str, adapter_type: str, resolution: int, buckets: Any,
                   clip_image_size: int, clip_mean, clip_std, dtype: str, encode_batch_size: int,
                   scaling_factor: float, shapes: dict, reference: dict | None = None, family: str,
                   max_sequence_length: int | None = None, shift_factor: float | None = None) -> dict:
    """The manifest's `options["cache"]`: what a cache was made from and how (``reference``: its augmented views).

    ``family``: the base's (sdxl, sd15, flux), so a cache is never read by another family's training;
    ``max_sequence_length``: FLUX's T5 length (None for UNet bases).

    ``shapes``: ``latent`` [channels, downscale factor], and the shape of ``prompt_embeds``,
    ``pooled_prompt_embeds`` (None without one) and ``image_features`` of one sample.
    """
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "family": family, "base_model": base_model,
            "reference": reference, "shapes": shapes, "max_sequence_length": max_sequence_length,
            "shift_factor": shift_factor,
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


def read_cache_file(location: str | Path, name: str) -> bytes:
    """The bytes of file `name` in a cache folder given as a local path or an fsspec URL."""
    location = str(location)
    if is_remote(location):
        import fsspec  # only needed for remote caches

        with fsspec.open(posixpath.join(location, name), "rb") as stream:
            return stream.read()
    return (Path(location.removeprefix("file://")) / name).read_bytes()


def read_cache_manifest(location: str | Path) -> Manifest | None:
    """The manifest of the folder at `location` (path or URL) when it is an embedding cache, else None."""
    try:
        raw = json.loads(read_cache_file(location, MANIFEST_NAME).decode("utf-8"))
        manifest = manifest_from_json(raw, f"{location}/{MANIFEST_NAME}")
    except FileNotFoundError:
        return None
    identity = manifest.options.get("cache")
    return manifest if isinstance(identity, dict) and identity.get("format") == CACHE_FORMAT else None


def identity_mismatch(found: dict, wanted: dict) -> str | None:
    """'resolution: cache 512, config 1024' for the first identity entry that differs, else None."""
    for key in IDENTITY_KEYS:
        if _normal(found.get(key)) != _normal(wanted.get(key)):
            return f"{key}: cache {found.get(key)!r}, config {wanted.get(key)!r}"
    return None


def family_mismatch(found: dict, family: str) -> str | None:
    """'the cache holds sdxl encoder outputs, this config trains flux' when the base families differ, else None."""
    made = found.get("family")
    if made == family:
        return None
    return f"the cache holds {made or 'unknown'} encoder outputs, this config trains {family}"


def _normal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return round(value, 6) if isinstance(value, float) else value


def encode_sample(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, bytes]:
    """One cached sample's members (safetensors, JSON, caption)."""
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return {"safetensors": save_tensors(contiguous), "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
            "txt": meta["caption"].encode("utf-8")}


class CacheError(ValueError):
    """The cache as a whole cannot be trained from (one line saying why and what to do)."""


@dataclass(frozen=True)
class CacheSpec:
    """What every sample of one cache must hold, and the empty caption's embeddings (text dropout)."""

    shapes: dict
    dtype: torch.dtype
    views: int
    sizes: frozenset  # the target (height, width) of every bucket
    empty_prompt: dict

    def expected(self, target_size: tuple[int, int]) -> dict[str, tuple[int, ...]]:
        """Tensor name → shape for a sample of this target (height, width)."""
        channels, factor = self.shapes["latent"]
        latent = (channels, target_size[0] // factor, target_size[1] // factor)
        out = {"latent_mean": latent, "latent_std": latent, "prompt_embeds": tuple(self.shapes["prompt_embeds"]),
               "image_features": tuple(self.shapes["image_features"])}
        if self.shapes.get("pooled_prompt_embeds") is not None:
            out["pooled_prompt_embeds"] = tuple(self.shapes["pooled_prompt_embeds"])
        if self.views:
            out[VIEWS_KEY] = (self.views, *out["image_features"])
        return out


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def load_spec(location: str | Path) -> CacheSpec:
    """The cache at `location` (path or URL) as training reads it; CacheError when it cannot be used."""
    manifest = read_cache_manifest(location)
    if manifest is None:
        raise CacheError(f"{location} is not an embedding cache (no cache manifest)")
    identity = manifest.options["cache"]
    shapes = identity.get("shapes")
    if identity.get("version") != CACHE_VERSION or not isinstance(shapes, dict) or identity.get("dtype") not in DTYPES:
        raise CacheError(f"the cache in {location} was made by another version of data_tools.precompute; "
                         "precompute it again")
    buckets = identity.get("buckets") or [[identity["resolution"]] * 2]
    spec = CacheSpec(shapes, DTYPES[identity["dtype"]], (identity.get("reference") or {}).get("views", 0),
                     frozenset((h, w) for w, h in buckets), {})
    return CacheSpec(spec.shapes, spec.dtype, spec.views, spec.sizes, _read_empty_prompt(location, spec))


def _read_empty_prompt(location: str | Path, spec: CacheSpec) -> dict[str, torch.Tensor]:
    what = f"{location}/{EMPTY_PROMPT_FILE}"
    redo = "run python -m data_tools.precompute again on this cache to rewrite it"
    try:
        tensors = load_tensors(read_cache_file(location, EMPTY_PROMPT_FILE))
    except FileNotFoundError:
        raise CacheError(f"{what} is missing (text dropout needs it); {redo}") from None
    except (SafetensorError, ValueError, RuntimeError, OSError) as error:
        raise CacheError(f"{what} is unreadable ({str(error).splitlines()[0]}); {redo}") from None
    wanted = {k: v for k, v in spec.expected((0, 0)).items() if k in ("prompt_embeds", "pooled_prompt_embeds")}
    try:
        return check_tensors(tensors, wanted, spec.dtype)
    except BadSample as error:
        raise CacheError(f"{what} does not fit the cache ({error}); {redo}") from None


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The expected tensors (extras dropped), each present, of its shape and dtype, and finite; else BadSample."""
    for key, shape in expected.items():
        if key not in tensors:
            raise BadSample("missing tensor", key)
        tensor = tensors[key]
        if tuple(tensor.shape) != shape:
            raise BadSample("wrong tensor shape", f"{key} is {tuple(tensor.shape)}, the cache's is {shape}")
        if tensor.dtype != dtype:
            raise BadSample("wrong tensor dtype", f"{key} is {tensor.dtype}, the cache's is {dtype}")
        if not torch.isfinite(tensor).all():
            raise BadSample("non-finite tensor", key)
    return {key: tensors[key] for key in expected}


_PAIRS = {"target_size": 1, "original_size": 1, "crop_top_left": 0}  # metadata pair → smallest allowed value


def decode_sample(members: dict[str, bytes], spec: CacheSpec) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of one cached sample, checked against the cache's spec; BadSample when it must be skipped."""
    if "safetensors" not in members or "json" not in members:
        raise BadSample("not a cached sample", "no .safetensors/.json member (data=cached needs a precomputed cache)")
    meta = decode_meta({"json": members["json"]})  # the image loader's JSON rules and reasons
    for key, low in _PAIRS.items():
        value = meta.get(key)
        if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int and low <= v <= MAX_SIDE for v in value)):
            raise BadSample("bad metadata", f"{key}={str(value)[:40]} is not two whole numbers in {low}..{MAX_SIDE}")
    if not isinstance(meta.get("caption"), str):
        raise BadSample("bad metadata", "no caption string")
    if tuple(meta["target_size"]) not in spec.sizes:
        raise BadSample("bad metadata", f"target_size={meta['target_size']} is none of the cache's sizes")
    try:
        tensors = load_tensors(members["safetensors"])
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError) as error:  # on bytes that are no tensors
        raise BadSample("bad cached tensors", str(error).splitlines()[0] if str(error) else type(error).__name__) from None
    return check_tensors(tensors, spec.expected(tuple(meta["target_size"])), spec.dtype), meta


def save_empty_prompt(folder: Path, prompt_embeds: torch.Tensor, pooled: torch.Tensor | None) -> None:
    """Write the empty caption's (prompt_embeds, pooled) once per cache."""
    from instantstyle.safe_paths import write_atomic

    tensors = {"prompt_embeds": prompt_embeds.detach().cpu().contiguous()}
    if pooled is not None:
        tensors["pooled_prompt_embeds"] = pooled.detach().cpu().contiguous()
    write_atomic(folder / EMPTY_PROMPT_FILE, save_tensors(tensors), "empty prompt")
