"""``${cache:SHARDS,CACHE_DIR,KEY}``: a data setting as the embedding cache's manifest records it (configs/data/cached.yaml).

With ``data=cached`` the cache decides resolution, buckets and CLIP input size, so the user need not
repeat them; a value given on the command line (or by an experiment) still wins over the interpolation,
and ``train.cached_data.check_cache`` then refuses it in one line if it differs from the cache.
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import OmegaConf

# What a folder without a cache manifest reads as; check_cache then says it is no cache.
FALLBACK = {"resolution": 1024, "buckets": "none", "clip_image_size": 224, "adapter_type": "ip_adapter"}


def cache_location(shards: Any, cache_dir: str | None) -> str | None:
    """Where the cache's manifest is: ``data.cache_dir``, else the folder of the first local shard."""
    from data_tools.shards import expand_shards

    if cache_dir:
        return str(cache_dir)
    try:
        urls = expand_shards(shards if isinstance(shards, str) else [str(s) for s in shards])
    except (ValueError, TypeError):
        return None  # check_data reports the shards themselves
    first = urls[0].removeprefix("file://")
    return None if first.startswith("pipe:") else os.path.dirname(first) if "://" in first \
        else os.path.dirname(os.path.abspath(first))


def cache_identity_of(shards: Any, cache_dir: str | None = None) -> dict | None:
    """The cache identity in the cache's manifest (None when there is none)."""
    location = cache_location(shards, cache_dir)
    if location is None:
        return None
    try:
        if "://" in location:  # object storage: the cache's own reader (imports torch, so only here)
            from data_tools.embedding_cache import read_cache_manifest

            manifest = read_cache_manifest(location)
        else:
            from data_tools.shards import read_manifest

            manifest = read_manifest(location)
    except (ValueError, OSError, TypeError):
        return None  # check_cache says what is wrong with it
    identity = manifest.options.get("cache") if manifest is not None else None
    return identity if isinstance(identity, dict) else None


def cache_setting(shards: Any, cache_dir: str | None, key: str) -> Any:
    """The cache's value of ``key`` (``buckets`` None → "none")."""
    identity = cache_identity_of(shards, cache_dir)
    if identity is None or key not in identity:
        return FALLBACK[key]
    value = identity[key]
    return "none" if key == "buckets" and value is None else value


def register_cache_resolver() -> None:
    """Make ``${cache:...}`` available to every composed config."""
    if not OmegaConf.has_resolver("cache"):
        OmegaConf.register_new_resolver("cache", cache_setting)


def cache_adapter_choice(argv: list[str], cached: bool, shards: Any, adapter_type: str,
                         cache_dir: str | None = None) -> list[str]:
    """``adapter=TYPE`` when a cached run chose no adapter and the cache was made for another one, else [].

    A group choice, not just ``adapter.type``: the Plus preset also brings its token count and resampler.
    ``python -m train`` adds it to the overrides as if typed; an explicit choice is left to check_cache.
    """
    if not cached or any(a.split("=", 1)[0].lstrip("+~") in ("adapter", "adapter.type") for a in argv):
        return []
    identity = cache_identity_of(shards, cache_dir) or {}
    made_for = identity.get("adapter_type")
    return [f"adapter={made_for}"] if made_for in ("ip_adapter", "ip_adapter_plus") and made_for != adapter_type else []
