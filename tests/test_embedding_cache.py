"""Embedding cache: precompute once, train without the encoders, bitwise the live loss and gradients."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from data_tools import precompute
from data_tools.embedding_cache import read_cache_manifest
from data_tools.shards import read_manifest
from instantstyle.models import load_base
from tests.helpers import assert_same_steps, tiny_overrides
from train.builders import build_adapter
from train.config import ConfigError, compose
from train.checks import check_config
from train.data import build_train_loader
from train.task import AdaptedUNet, DiffusionTask

STYLE = "up_blocks.0.attentions.1"


def run_precompute(model_dir: str, shards: str, out: Path, *extra: str) -> int:
    return precompute.main(["--base", model_dir, "--shards", f"{shards}/*.tar", "--out", str(out), "--resolution", "64",
                            "--batch-size", "2", "--dtype", "fp32", *extra])


@pytest.fixture(scope="module")
def cache(tiny_model_dir, shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "cache"
    assert run_precompute(tiny_model_dir, shards, out) == 0
    return out


def data_cfg(shards: str, **overrides) -> dict:
    return {"shards": f"{shards}/*.tar", "resolution": 64, "num_workers": 0, "shuffle_buffer": 8,
            "drop_image_prob": 0.25, "drop_text_prob": 0.25, "drop_both_prob": 0.1, **overrides}


def task_on(base, seed: int = 0) -> tuple[DiffusionTask, torch.nn.Module]:
    torch.manual_seed(0)
    adapter = build_adapter(base, blocks=[STYLE], type="ip_adapter", num_tokens=4, resampler_dim=64)
    task = DiffusionTask(base, AdaptedUNet(base.unet, adapter), adapter_type="ip_adapter",
                         generator=torch.Generator().manual_seed(seed))
    return task, adapter


def test_cached_training_is_bitwise_live_training(tiny_model_dir, shards, cache):
    live_batches = itertools.islice(iter(build_train_loader(data_cfg(shards), batch_size=2, seed=3, rank=0,
                                                            world_size=1)), 6)
    cached_batches = itertools.islice(iter(build_train_loader(data_cfg(str(cache), cached=True), batch_size=2, seed=3,
                                                              rank=0, world_size=1)), 6)
    live, live_adapter = task_on(load_base(tiny_model_dir))
    cached_base = load_base(tiny_model_dir, encoders=False)
    assert cached_base.vae.device.type == cached_base.text_encoder.device.type == "meta"  # never loaded
    cached, cached_adapter = task_on(cached_base)
    assert_same_steps(live, cached, live_adapter, cached_adapter, zip(live_batches, cached_batches))


def test_manifest_names_what_made_the_cache(cache, shards, tiny_model_dir):
    manifest = read_manifest(cache)
    identity = read_cache_manifest(cache).options["cache"]
    assert manifest.complete and manifest.num_samples == 32 and len(manifest.shards) == 4
    assert identity["resolution"] == 64 and identity["adapter_type"] == "ip_adapter" and identity["dtype"] == "fp32"
    assert identity["base_model"] == str(Path(tiny_model_dir).resolve()) and identity["encode_batch_size"] == 2
    assert (cache / "empty_prompt.safetensors").is_file()


def test_precompute_resumes_after_a_kill_and_is_deterministic(tiny_model_dir, shards, cache, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    assert run_precompute(tiny_model_dir, shards, out, "--stop-after", "2") == 0  # "killed" after two shards
    assert len(list(out.glob("*.tar"))) == 2 and not read_manifest(out).complete
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    encoded = []
    real = precompute.cache_shard
    monkeypatch.setattr(precompute, "cache_shard", lambda base, url, *a: encoded.append(Path(url).name) or real(base, url, *a))
    assert run_precompute(tiny_model_dir, shards, out) == 0
    assert sorted(encoded) == sorted(set(p.name for p in cache.glob("*.tar")) - set(done))  # only the missing ones
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in done.items())
    assert read_manifest(out).complete
    for shard in cache.glob("*.tar"):  # same bytes as the uninterrupted run
        assert (out / shard.name).read_bytes() == shard.read_bytes()


def test_precompute_refuses_an_out_folder_of_another_cache(tiny_model_dir, shards, cache, capsys):
    assert run_precompute(tiny_model_dir, shards, cache, "--adapter-type", "ip_adapter_plus") == 2
    assert "holds a cache made differently" in capsys.readouterr().err


@pytest.mark.parametrize("override,what", [("data.resolution=32", "resolution"),
                                           ("adapter=ip_adapter_plus", "adapter_type"),
                                           ("data.buckets=sdxl", "buckets")])
def test_mismatched_cache_fails_at_start_with_one_line(tiny_model_dir, cache, tmp_path, override, what):
    cfg = compose(tiny_overrides(tiny_model_dir, str(cache), tmp_path / "run", "data=cached", override))
    with pytest.raises(ConfigError, match=what) as err:
        check_config(cfg)
    assert "\n" not in str(err.value)


def test_images_are_not_a_cache(tiny_model_dir, shards, tmp_path):
    cfg = compose(tiny_overrides(tiny_model_dir, shards, tmp_path / "run", "data=cached"))
    with pytest.raises(ConfigError, match="not an embedding cache"):
        check_config(cfg)


def test_train_from_cache_end_to_end(tiny_model_dir, cache, tmp_path):
    from train.training import train

    cfg = compose(tiny_overrides(tiny_model_dir, str(cache), tmp_path / "run", "data=cached", "trainer.max_steps=2",
                                 "trainer.checkpoint_every=0", "trainer.validate_every=1"))
    run = train(cfg)
    assert run.summary["step"] == 2 and run.summary["final_loss"] > 0 and (tmp_path / "run" / "ip-adapter.safetensors").is_file()
    assert run.base.vae.device.type == "meta" and run.base.image_encoder.device.type == "meta"


def test_cached_augmented_views_serve_reference_augmentation(tiny_model_dir, shards, cache, tmp_path):
    out = tmp_path / "views"
    views = ("--reference-views", "3", "--reference-shuffle-grid", "4")
    assert run_precompute(tiny_model_dir, shards, out, *views) == 0
    assert read_cache_manifest(out).options["cache"]["reference"] == {"views": 3, "crop": None, "flip_prob": 0.0, "shuffle_grid": 4}
    augmented = data_cfg(str(out), cached=True, reference_shuffle_grid=4)
    plain_views = data_cfg(str(out), cached=True)
    plain = data_cfg(str(cache), cached=True)
    take = lambda cfg: next(iter(build_train_loader(cfg, batch_size=4, seed=3, rank=0, world_size=1)))  # noqa: E731
    a, b, c = take(augmented), take(plain_views), take(plain)
    assert a["keys"] == b["keys"] == c["keys"] and torch.equal(a["drop_image"], c["drop_image"])  # drawn last
    assert torch.equal(b["image_features"], c["image_features"])  # augmentation off: the plain view, as before
    assert not torch.equal(a["image_features"], c["image_features"])  # on: one of the augmented views
    assert torch.equal(a["latent_mean"], c["latent_mean"])  # the target is untouched
    cfg = compose(tiny_overrides(tiny_model_dir, str(cache), tmp_path / "run", "data=cached",
                                 "data.reference_shuffle_grid=4"))
    with pytest.raises(ConfigError, match="the cache has no augmented views"):
        check_config(cfg)


def test_a_cache_streamed_through_pipe_trains_as_the_local_cache(tiny_model_dir, cache, tmp_path):
    from train.training import train

    steps = ("data=cached", "trainer.max_steps=3", "trainer.checkpoint_every=0")
    local = train(compose(tiny_overrides(tiny_model_dir, str(cache), tmp_path / "local", *steps)))
    piped = compose([*tiny_overrides(tiny_model_dir, str(cache), tmp_path / "piped", *steps),
                     f"data.shards='pipe:cat {cache}/{{00000..00003}}.tar'", f"data.cache_dir={cache}"])
    assert piped.data.shards.startswith("pipe:cat")
    streamed = train(piped)
    assert streamed.summary["final_loss"] == local.summary["final_loss"]
    assert streamed.summary["samples_seen"] == local.summary["samples_seen"] == 6


def test_pipe_shards_of_a_cache_need_its_folder(tiny_model_dir, cache, tmp_path):
    cfg = compose([*tiny_overrides(tiny_model_dir, str(cache), tmp_path / "run", "data=cached"),
                   f"data.shards='pipe:cat {cache}/00000.tar'"])
    with pytest.raises(ConfigError, match="set data.cache_dir"):
        check_config(cfg)


def test_a_cache_at_an_fsspec_url_reads_as_the_local_cache(tiny_model_dir, cache, tmp_path):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    for path in cache.iterdir():
        memory.pipe(f"/remote_cache/{path.name}", path.read_bytes())
    cfg = compose([*tiny_overrides(tiny_model_dir, str(cache), tmp_path / "run", "data=cached"),
                   "data.shards='memory://remote_cache/{00000..00003}.tar'"])
    settings = check_config(cfg)  # manifest and empty prompt read from the URL's folder
    take = lambda shards: list(itertools.islice(iter(build_train_loader(  # noqa: E731
        {**data_cfg(str(cache), cached=True), "shards": shards}, batch_size=2, seed=3, rank=0, world_size=1)), 4))
    remote, local = take(settings.shard_urls), take(f"{cache}/*.tar")
    for a, b in zip(remote, local):
        assert a["keys"] == b["keys"] and torch.equal(a["latent_mean"], b["latent_mean"])


def test_cached_worker_batches_arrive_in_shared_memory_equal_to_in_process_ones(cache):
    take = lambda workers: list(itertools.islice(iter(build_train_loader(  # noqa: E731
        data_cfg(str(cache), cached=True, num_workers=workers), batch_size=2, seed=3, rank=0, world_size=1)), 3))
    for a, b in zip(take(0), take(1)):
        assert a["keys"] == b["keys"] and b["latent_mean"].is_shared()
        assert all(torch.equal(a[k], b[k]) for k in ("latent_mean", "latent_std", "prompt_embeds", "image_features"))
