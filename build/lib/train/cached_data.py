"""``data=cached``: batches of precomputed encoder outputs (``python -m data_tools.precompute``).

The sample order, resume and bad-sample handling are the image loader's own (``train.data``); only
decoding and collating differ. Text dropout swaps in the cache's empty-caption embeddings and image
dropout zeroes the image features in the task, exactly as live training does, drawn from the same
per-position RNG, so a cached run sees the same drops as a live one.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from data_tools.buckets import parse_buckets
from data_tools.embedding_cache import TENSOR_KEYS, VIEWS_KEY, decode_sample as decode_members, identity_mismatch, \
    load_empty_prompt, read_identity, source_id
from data_tools.shards import BadSample, RawSample
from train.batch import conditioning
from train.config import ConfigError, DataConfig
from train.dropout import draw_drops, reference_augment


@functools.lru_cache(maxsize=4)
def _empty_prompt(folder: str) -> dict[str, torch.Tensor]:
    return load_empty_prompt(folder)  # once per worker process and cache


def decode_cached(raw: RawSample, cfg: DataConfig, rng: np.random.Generator) -> dict:
    """Members of a cached sample → one example (tensors + conditioning); BadSample when it must be skipped."""
    if raw.error:
        raise BadSample(raw.error)
    tensors, meta = decode_members(raw.members)
    drop_image, drop_text = draw_drops(rng, cfg)
    if drop_text:
        tensors.update(_empty_prompt(os.path.dirname(raw.shard)))
    views = tensors.pop(VIEWS_KEY, None)
    if views is not None and reference_augment(cfg) is not None:  # one of the cached augmented views, drawn last
        tensors["image_features"] = views[int(rng.integers(len(views)))]
    height, width = meta["target_size"]
    return {"key": raw.key, "caption": "" if drop_text else meta["caption"], "drop_image": drop_image,
            "tensors": tensors, "bucket": (width, height), "original_size": tuple(meta["original_size"]),
            "crop": tuple(meta["crop_top_left"])}


def collate_cached(examples: list[dict], cfg: DataConfig) -> dict:
    """Stack cached examples: the encoder outputs plus the same conditioning fields as an image batch."""
    batch = {k: torch.stack([e["tensors"][k] for e in examples]) for k in TENSOR_KEYS if k in examples[0]["tensors"]}
    return {**batch, **conditioning(examples)}


def reference_mismatch(views: dict | None, data: DataConfig) -> str | None:
    """Why the cache's augmented views cannot serve the data config's reference augmentation (None: they can)."""
    if reference_augment(data) is None:
        return None
    if views is None:
        return "reference augmentation: the cache has no augmented views (precompute with --reference-views K)"
    wanted = {"crop": list(data.reference_crop) if data.reference_crop else None,
              "flip_prob": data.reference_flip_prob, "shuffle_grid": data.reference_shuffle_grid}
    made = {k: views.get(k) for k in wanted}
    return None if made == wanted else f"reference augmentation: cache {made}, config {wanted}"


def check_cache(data: DataConfig, urls: list[str], *, model_path: str, image_encoder: str | None,
                adapter_type: str) -> dict:
    """The cache fits this config (base, encoders, resolution, buckets, adapter type); its identity, or ConfigError."""
    from instantstyle.models import BaseModelError, resolve_image_encoder

    folders = {os.path.dirname(os.path.abspath(u)) for u in urls}
    if len(folders) != 1 or any(u.startswith("pipe:") or "://" in u for u in urls):
        raise ConfigError("data=cached reads one local cache folder: data.shards='CACHE/*.tar'")
    folder = folders.pop()
    found = read_identity(folder)
    if found is None:
        raise ConfigError(f"data.shards: {folder} is not an embedding cache (no cache manifest); make one with "
                          f"python -m data_tools.precompute --base {model_path} --shards 'IMAGES/*.tar' --out {folder}")
    if data.random_crop or data.random_flip:
        raise ConfigError("data=cached: crops are fixed when the cache is made; set data.random_crop=false "
                          "data.random_flip=false (or train from images with data=webdataset)")
    try:
        enc_path, enc_sub = resolve_image_encoder(model_path, image_encoder)
    except BaseModelError as err:
        raise ConfigError(str(err)) from err
    buckets = parse_buckets(data.buckets, data.resolution)
    wanted = {"base_model": source_id(model_path), "image_encoder": source_id(f"{enc_path}:{enc_sub}" if enc_sub else enc_path),
              "adapter_type": adapter_type, "resolution": data.resolution,
              "buckets": None if buckets is None else [list(b) for b in buckets],
              "clip_image_size": data.clip_image_size, "clip_mean": list(data.clip_mean), "clip_std": list(data.clip_std)}
    mismatch = identity_mismatch(found, wanted) or reference_mismatch(found.get("reference"), data)
    if mismatch:
        raise ConfigError(f"data.shards: the cache in {folder} was made for another setup ({mismatch}); "
                          "precompute it for this config or train from images with data=webdataset")
    return found
