"""A broken cached sample is skipped and counted like a broken image; a broken cache is refused at start in one line."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from data_tools.shards import Sample, iter_samples, open_shard, read_manifest, write_manifest, write_shard
from tests.helpers import tiny_overrides
from tests.test_embedding_cache import run_precompute
from train.checks import check_config
from train.config import ConfigError, compose
from train.data import build_train_loader

VIEWS = ("--reference-views", "2", "--reference-shuffle-grid", "2")


@pytest.fixture(scope="module")
def views_cache(tiny_model_dir, shards, tmp_path_factory) -> Path:
    """A cache with two augmented reference views per sample (the views are a tensor that can break too)."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    assert run_precompute(tiny_model_dir, shards, out, *VIEWS) == 0
    return out


def _tensors(members: dict) -> dict:
    return load_tensors(members["safetensors"])


def _with_tensors(members: dict, tensors: dict) -> None:
    members["safetensors"] = save_tensors({k: v.contiguous() for k, v in tensors.items()})


def _edit_meta(members: dict, **changes) -> None:
    meta = json.loads(members["json"])
    meta.update(changes)
    members["json"] = json.dumps({k: v for k, v in meta.items() if v is not None}).encode()


def _break(members: dict, how: str) -> None:
    t = _tensors(members)
    if how == "random bytes":
        members["safetensors"] = np.random.default_rng(0).integers(0, 256, 700, dtype=np.uint8).tobytes()
    elif how == "missing tensor":
        _with_tensors(members, {k: v for k, v in t.items() if k != "image_features"})
    elif how == "wrong shape":
        _with_tensors(members, {**t, "latent_mean": t["latent_mean"][:, :-1]})
    elif how == "wrong dtype":
        _with_tensors(members, {**t, "prompt_embeds": t["prompt_embeds"].half()})
    elif how == "nan":
        _with_tensors(members, {**t, "image_features": torch.full_like(t["image_features"], float("nan"))})
    elif how == "zero views":
        _with_tensors(members, {**t, "image_feature_views": t["image_feature_views"][:0]})
    elif how == "malformed json":
        members["json"] = b'{"caption": "a", "target_size": [64'
    elif how == "no target_size":
        _edit_meta(members, target_size=None)
    elif how == "foreign target_size":
        _edit_meta(members, target_size=[128, 64])
    elif how == "no safetensors":
        del members["safetensors"]


# Each kind of damage → the reason the loader counts it under (the image loader's "bad json" and "bad metadata" too).
DAMAGE = {"random bytes": "bad cached tensors", "missing tensor": "missing tensor", "wrong shape": "wrong tensor shape",
          "wrong dtype": "wrong tensor dtype", "nan": "non-finite tensor", "zero views": "wrong tensor shape",
          "malformed json": "bad json", "no target_size": "bad metadata", "foreign target_size": "bad metadata",
          "no safetensors": "not a cached sample"}


def damaged_copy(cache: Path, out: Path, kinds: list[str]) -> set[str]:
    """Copy the cache, breaking one sample per kind, spread over the shards; returns the broken keys."""
    shutil.copytree(cache, out)
    shards, broken = sorted(out.glob("*.tar")), set()
    for i, shard in enumerate(shards):
        with open_shard(str(shard)) as stream:
            samples = [Sample(raw.key, dict(raw.members)) for raw in iter_samples(stream, str(shard))]
        for sample, how in zip(samples, kinds[i::len(shards)]):
            _break(sample.members, how)
            broken.add(sample.key)
        write_shard(shard, samples)
    return broken


def cached_cfg(folder: Path, **overrides) -> dict:
    return {"shards": f"{folder}/*.tar", "resolution": 64, "num_workers": 0, "shuffle_buffer": 8, "cached": True,
            "reference_shuffle_grid": 2, "drop_text_prob": 0.3, **overrides}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_broken_cached_sample_is_skipped_and_counted_by_reason(views_cache, tmp_path, how):
    broken = damaged_copy(views_cache, tmp_path / "c", [how])
    loader = build_train_loader(cached_cfg(tmp_path / "c"), batch_size=2, seed=0, rank=0, world_size=1)
    batches = list(itertools.islice(iter(loader), 31))  # 31 good samples a epoch: two epochs, minus the last half batch
    keys = [k for b in batches for k in b["keys"]]
    assert not broken & set(keys) and len(set(keys)) == 31
    assert loader.skipped() == {DAMAGE[how]: 2}  # once per epoch


def test_training_through_every_kind_of_broken_cached_sample(views_cache, tiny_model_dir, tmp_path):
    from train.training import train

    damaged_copy(views_cache, tmp_path / "c", sorted(DAMAGE))
    cfg = compose(tiny_overrides(tiny_model_dir, str(tmp_path / "c"), tmp_path / "run", "data=cached",
                                 "data.reference_shuffle_grid=2", "data.drop_text_prob=0.5", "trainer.max_steps=12",
                                 "trainer.checkpoint_every=0"))
    run = train(cfg)
    assert run.summary["step"] == 12 and np.isfinite(run.summary["final_loss"])
    want: dict[str, int] = {}
    for reason in DAMAGE.values():
        want[reason] = want.get(reason, 0) + 1
    # 12 steps of 2 need 24 of the epoch's 22 good samples: every broken one was read, some maybe twice.
    skipped = run.loader.skipped()
    assert skipped.keys() == want.keys() and all(want[r] <= skipped[r] <= 2 * want[r] for r in want)


def _config_error(model_dir: str, cache: Path, tmp_path: Path, *extra: str) -> str:
    cfg = compose(tiny_overrides(model_dir, str(cache), tmp_path / "run", "data=cached", *extra))
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("damage,message", [("delete", "empty_prompt.safetensors is missing"),
                                            ("garbage", "empty_prompt.safetensors is unreadable"),
                                            ("wrong shape", "empty_prompt.safetensors does not fit the cache")])
def test_a_missing_or_broken_empty_prompt_is_refused_at_start(views_cache, tiny_model_dir, tmp_path, damage, message):
    cache = tmp_path / "c"
    shutil.copytree(views_cache, cache)
    path = cache / "empty_prompt.safetensors"
    if damage == "delete":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"\xff" * 64)
    else:
        tensors = load_tensors(path.read_bytes())
        path.write_bytes(save_tensors({k: v[..., :-1].contiguous() for k, v in tensors.items()}))
    assert message in _config_error(tiny_model_dir, cache, tmp_path, "data.reference_shuffle_grid=2")


def test_an_interrupted_cache_is_refused_at_start(views_cache, tiny_model_dir, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(views_cache, cache)
    manifest = read_manifest(cache)
    manifest.complete, manifest.shards = False, manifest.shards[:-1]  # as precompute leaves it when killed
    write_manifest(cache, manifest)
    (cache / sorted(p.name for p in cache.glob("*.tar"))[-1]).unlink()
    assert "is incomplete" in _config_error(tiny_model_dir, cache, tmp_path, "data.reference_shuffle_grid=2")
