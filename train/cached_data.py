"""``data=cached``: batches of precomputed encoder outputs (``python -m data_tools.precompute``).

The sample order, resume and bad-sample handling are the image loader's own (``train.data``); only
decoding and collating differ. Every cached sample is checked against the shapes the cache's manifest
records (``data_tools.embedding_cache.decode_sample``), so a broken one is skipped and counted by reason
exactly as a broken image is. Shards may be local, ``pipe:`` commands or fsspec URLs; ``data.cache_dir``
names the folder of the manifest where the shards' own folder cannot (``pipe:``).

Text dropout swaps in the cache's empty-caption embeddings and image dropout zeroes the image
features in the task, exactly as live training does, drawn from the same per-position RNG, so a
cached run sees the same drops as a live one.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np

from data_tools.augment import draw_drops, reference_augment
from data_tools.buckets import parse_buckets
from data_tools.embedding_cache import VIEWS_KEY, CacheError, CacheSpec, decode_sample as decode_members, \
    family_mismatch, identity_mismatch, load_spec, read_cache_manifest, source_id
from data_tools.decode import BadSample
from data_tools.shards import RawSample, is_remote
from train.config import ConfigError, DataConfig

log = logging.getLogger(__name__)


def cache_location(cfg: DataConfig, url: str) -> str:
    """Where the cache's manifest and empty prompt are: data.cache_dir, else the folder of the shard `url`."""
    if cfg.cache_dir:
        return str(cfg.cache_dir)
    return url.rsplit("/", 1)[0] if is_remote(url) else os.path.dirname(os.path.abspath(url.removeprefix("file://")))


@functools.lru_cache(maxsize=4)
def _spec(location: str) -> CacheSpec:
    return load_spec(location)  # once per worker process and cache (check_cache has read it once already)


def decode_cached(raw: RawSample, cfg: DataConfig, rng: np.random.Generator) -> dict:
    """Members of a cached sample → one example (tensors + conditioning); BadSample when it must be skipped."""
    if raw.error:
        raise BadSample(raw.error)
    spec = _spec(cache_location(cfg, raw.shard))
    tensors, meta = decode_members(raw.members, spec)
    drop_image, drop_text = draw_drops(rng, cfg)
    if drop_text:
        tensors.update(spec.empty_prompt)
    views = tensors.pop(VIEWS_KEY, None)
    if views is not None and reference_augment(cfg) is not None:  # one of the cached augmented views, drawn last
        tensors["image_features"] = views[int(rng.integers(len(views)))]
    height, width = meta["target_size"]
    return {"key": raw.key, "caption": "" if drop_text else meta["caption"], "drop_image": drop_image,
            "tensors": tensors, "bucket": (width, height), "original_size": tuple(meta["original_size"]),
            "crop": tuple(meta["crop_top_left"])}


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
                adapter_type: str, family: str | None = None) -> dict:
    """The cache fits this config (family, base, encoders, resolution, buckets, adapter); its identity, or ConfigError.

    ``family`` None: the base is not built yet (build_if_missing), so no cache can have been made from it.
    """
    folder = _one_location(data, urls)
    try:
        manifest = read_cache_manifest(folder)
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.shards: the cache manifest in {folder} is unreadable ({err})") from err
    if manifest is None:
        raise ConfigError(f"data.shards: {folder} is not an embedding cache (no cache manifest); make one with "
                          f"python -m data_tools.precompute --base {model_path} --shards 'IMAGES/*.tar' --out {folder}")
    _check_complete(manifest, folder, urls)
    found = manifest.options["cache"]
    wrong_family = family and family_mismatch(found, family)
    if wrong_family:
        raise ConfigError(f"data.shards: {wrong_family} ({folder}); precompute a cache with this config's "
                          f"model.path or train from images with data=webdataset")
    if data.random_crop or data.random_flip:
        raise ConfigError("data=cached: crops are fixed when the cache is made; set data.random_crop=false "
                          "data.random_flip=false (or train from images with data=webdataset)")
    wanted = _wanted_identity(data, model_path, image_encoder, adapter_type, family)
    mismatch = identity_mismatch(found, wanted) or \
        reference_mismatch(found.get("reference"), data)
    if mismatch:
        raise ConfigError(f"data.shards: the cache in {folder} was made for another setup ({mismatch}); "
                          "precompute it for this config or train from images with data=webdataset")
    try:
        load_spec(folder)
    except CacheError as err:
        raise ConfigError(f"data.shards: {err}") from err
    return found


def check_not_a_cache(urls: list[str]) -> None:
    """Image training (data=webdataset) refuses shards whose folder holds an embedding cache, in one line."""
    for folder in {os.path.dirname(u.removeprefix("file://")) or "." for u in urls
                   if not u.startswith("pipe:") and not is_remote(u)}:
        try:
            cache = read_cache_manifest(folder)
        except (OSError, ValueError, TypeError):
            cache = None  # a broken manifest only costs the image loader its counts
        if cache:
            raise ConfigError(f"data.shards: {folder} holds an embedding cache, not images; "
                              "train from it with data=cached")


def _one_location(data: DataConfig, urls: list[str]) -> str:
    """The one folder (path or URL) holding the cache's manifest; ConfigError when there is none or several."""
    if data.cache_dir:
        return str(data.cache_dir)
    if any(u.startswith("pipe:") for u in urls):
        raise ConfigError("data=cached with pipe: shards: set data.cache_dir to the cache folder (local path or URL) "
                          "that holds its manifest.json and empty_prompt.safetensors")
    folders = {cache_location(data, u) for u in urls}
    if len(folders) != 1:
        raise ConfigError(f"data=cached reads one cache folder, but data.shards spans {len(folders)}: "
                          "data.shards='CACHE/*.tar'")
    return folders.pop()


def _check_complete(manifest, folder: str, urls: list[str]) -> None:
    """A cache whose precompute did not finish would train on part of the data without a word."""
    if not manifest.complete:
        raise ConfigError(f"data.shards: the cache in {folder} is incomplete (data_tools.precompute was stopped "
                          "before it finished); run the same precompute command again to finish it")
    listed = {s.name for s in manifest.shards}
    unlisted = [u for u in urls if not u.startswith("pipe:") and u.rsplit("/", 1)[-1] not in listed]
    if unlisted:
        raise ConfigError(f"data.shards: {unlisted[0]} is not one of the {len(listed)} shards in the cache manifest "
                          f"of {folder}")
    if len(urls) < len(listed):
        log.warning("data.shards names %d of the cache's %d shards: training on those only", len(urls), len(listed))


def _wanted_identity(data: DataConfig, model_path: str, image_encoder: str | None, adapter_type: str,
                     family: str | None) -> dict:
    """The identity entries a cache for this config must carry."""
    from instantstyle.models import BaseModelError, resolve_image_encoder

    try:
        enc_path, enc_sub = resolve_image_encoder(model_path, image_encoder)
    except BaseModelError as err:
        raise ConfigError(str(err)) from err
    buckets = parse_buckets(data.buckets, data.resolution)
    return {"base_model": source_id(model_path), "image_encoder": source_id(f"{enc_path}:{enc_sub}" if enc_sub else enc_path),
            "adapter_type": adapter_type, "resolution": data.resolution,
            "buckets": None if buckets is None else [list(b) for b in buckets],
            "clip_image_size": data.clip_image_size, "clip_mean": list(data.clip_mean), "clip_std": list(data.clip_std),
            "max_sequence_length": _flux_text_length() if family == "flux" else None}


def _flux_text_length() -> int:
    """The T5 length FLUX training encodes captions at (a cache must hold sequences of it)."""
    from instantstyle.flux_models import MAX_SEQUENCE_LENGTH

    return MAX_SEQUENCE_LENGTH
