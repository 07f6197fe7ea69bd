"""model=flux from the embedding cache: precompute on the tiny FLUX base, then train bitwise as live encoding does."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from data_tools.embedding_cache import read_cache_manifest
from instantstyle.flux_models import MAX_SEQUENCE_LENGTH, load_flux_base
from tests.helpers import assert_same_steps, tiny_overrides
from tests.test_embedding_cache import run_precompute
from train.checks import check_config
from train.config import ConfigError, compose
from train.data import build_train_loader
from train.flux_builders import build_flux_adapter
from train.flux_task import AdaptedFluxTransformer, FluxTask


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    from data_tools.make_tiny_flux import save_tiny_flux

    return str(save_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "base", seed=0))


@pytest.fixture(scope="module")
def flux_cache(flux_dir, shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flux_cache") / "cache"
    assert run_precompute(flux_dir, shards, out) == 0
    return out


def flux_overrides(flux_dir: str, shards: str, out, *extra: str) -> list[str]:
    return tiny_overrides(flux_dir, shards, out, "model=flux", "model.image_encoder=null",
                          "blocks.targets=[double_blocks.1]", *extra)


def data_cfg(shards: str, **overrides) -> dict:
    return {"shards": f"{shards}/*.tar", "resolution": 64, "num_workers": 0, "shuffle_buffer": 8,
            "drop_image_prob": 0.25, "drop_text_prob": 0.25, "drop_both_prob": 0.1, **overrides}


def task_on(base) -> tuple[FluxTask, torch.nn.Module]:
    torch.manual_seed(0)
    adapter = build_flux_adapter(base, blocks=["double_blocks.1"], num_tokens=4)
    return FluxTask(base, AdaptedFluxTransformer(base.transformer, adapter),
                    generator=torch.Generator().manual_seed(0)), adapter


def test_flux_cached_training_is_bitwise_live_training(flux_dir, shards, flux_cache):
    # Bitwise, not to a tolerance: precompute encodes every chunk at the training batch size (2) in fp32
    # and stores fp32, and the task draws the latent from the stored distribution with the same generator.
    take = lambda cfg: itertools.islice(iter(build_train_loader(cfg, batch_size=2, seed=3, rank=0,  # noqa: E731
                                                                world_size=1)), 6)
    live, live_adapter = task_on(load_flux_base(flux_dir))
    cached_base = load_flux_base(flux_dir, encoders=False)
    assert {m.device.type for m in cached_base.frozen_modules()[1:]} == {"meta"}  # VAE, CLIP, T5, image encoder
    cached, cached_adapter = task_on(cached_base)
    live_opt, cached_opt = (torch.optim.SGD(a.parameters(), lr=0.1) for a in (live_adapter, cached_adapter))
    assert_same_steps(live, cached, live_adapter, cached_adapter,
                      zip(take(data_cfg(shards)), take(data_cfg(str(flux_cache), cached=True))), (live_opt, cached_opt))
    for p, q in zip(live_adapter.parameters(), cached_adapter.parameters()):
        assert torch.equal(p, q)


def test_flux_cache_records_family_and_t5_length(flux_cache, flux_dir):
    identity = read_cache_manifest(flux_cache).options["cache"]
    assert identity["family"] == "flux" and identity["max_sequence_length"] == MAX_SEQUENCE_LENGTH
    assert identity["shapes"]["latent"] == [16, 8]  # unpacked: the task packs 2x2 patches as it does live
    assert identity["shapes"]["prompt_embeds"] == [MAX_SEQUENCE_LENGTH, 48]  # tiny T5 width
    assert identity["shapes"]["pooled_prompt_embeds"] == [32] and identity["shift_factor"] == pytest.approx(0.1159)


def test_a_cache_of_another_family_is_refused_in_one_line(flux_dir, tiny_model_dir, shards, flux_cache, tmp_path):
    sdxl_cache = tmp_path / "sdxl_cache"
    assert run_precompute(tiny_model_dir, shards, sdxl_cache) == 0
    assert read_cache_manifest(sdxl_cache).options["cache"]["family"] == "sdxl"
    flux_on_sdxl = compose(flux_overrides(flux_dir, str(sdxl_cache), tmp_path / "a", "data=cached"))
    sdxl_on_flux = compose(tiny_overrides(tiny_model_dir, str(flux_cache), tmp_path / "b", "data=cached"))
    for cfg, message in ((flux_on_sdxl, "holds sdxl encoder outputs, this config trains flux"),
                         (sdxl_on_flux, "holds flux encoder outputs, this config trains sdxl")):
        with pytest.raises(ConfigError, match=message) as err:
            check_config(cfg)
        assert "\n" not in str(err.value)


def test_flux_precompute_refuses_ip_adapter_plus(flux_dir, shards, tmp_path, capsys):
    assert run_precompute(flux_dir, shards, tmp_path / "c", "--adapter-type", "ip_adapter_plus") == 2
    assert capsys.readouterr().err.startswith("error: FLUX adapters read image_embeds")


def test_flux_trains_from_the_cache_end_to_end(flux_dir, flux_cache, tmp_path):
    from train.training import train

    run = train(compose(flux_overrides(flux_dir, str(flux_cache), tmp_path / "run", "data=cached",
                                       "trainer.max_steps=2", "trainer.checkpoint_every=0",
                                       "trainer.validate_every=1")))
    assert run.summary["step"] == 2 and run.summary["final_loss"] > 0
    assert (tmp_path / "run" / "ip-adapter.safetensors").is_file()
    assert run.base.pipe.text_encoder_2.device.type == "meta" and run.base.vae.device.type == "meta"


def test_a_cache_recording_no_family_is_refused_for_every_family():
    from data_tools.embedding_cache import family_mismatch

    unknown = {"base_model": "/bases/sdxl"}  # every cache precompute writes names its family
    for family in ("sdxl", "sd15", "flux"):
        assert family_mismatch(unknown, family) == f"the cache holds unknown encoder outputs, this config trains {family}"
