"""Validation images in a run that trains from an embedding cache: encoders in host memory, on the device to validate."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import train.cached_validation as cached_validation
import train.loop as loop
from tests.helpers import tiny_overrides
from tests.test_embedding_cache import cache  # noqa: F401 -- the module's embedding-cache fixture
from tests.test_validation import METRICS, styles, validation_args  # noqa: F401 -- the style references fixture
from train.cached_validation import HOST, encoders_on
from train.config import compose
from train.training import train


def test_cached_run_writes_validation_images_with_encoders_brought_in_for_validation_only(
        monkeypatch, tiny_model_dir, cache, styles, tmp_path):  # noqa: F811
    visits = []

    def spied(base, device):
        visits.append(base.image_encoder.device.type)  # where the encoders wait between validations
        return encoders_on(base, device)

    monkeypatch.setattr(loop, "encoders_on", spied)
    out = tmp_path / "run"
    run = train(compose(tiny_overrides(tiny_model_dir, str(cache), out, "data=cached", "trainer.max_steps=2",
                                       "trainer.checkpoint_every=0", *validation_args(styles, every=1))))
    assert run.step == 2 and visits == ["cpu", "cpu"]
    for step in (1, 2):
        folder = out / "eval" / f"step-{step:08d}"
        assert (folder / "grid.png").is_file() and (folder / "metrics.json").is_file()
    means = run.summary["validation"]
    assert means["step"] == 2 and all(math.isfinite(means[m]) for m in METRICS)
    base = run.base
    assert base.vae.encoder is None  # nothing encodes pixels in a cached run
    assert all(m.device == HOST and not any(p.is_meta for p in m.parameters())
               for m in (base.vae, base.text_encoder, base.text_encoder_2, base.image_encoder))


def test_a_cache_streamed_through_a_pipe_writes_validation_images(tiny_model_dir, cache, styles, tmp_path):  # noqa: F811
    """The 4M-image setting: the cache comes from object storage through pipe:, and the run still shows images."""
    out = tmp_path / "run"
    cfg = compose([*tiny_overrides(tiny_model_dir, str(cache), out, "data=cached", "trainer.max_steps=2",
                                   "trainer.checkpoint_every=0", *validation_args(styles, every=2)),
                   f"data.shards='pipe:cat {cache}/{{00000..00003}}.tar'", f"data.cache_dir={cache}"])
    run = train(cfg)
    assert run.step == 2 and run.summary["samples_seen"] == 4
    assert (out / "eval" / "step-00000002" / "grid.png").is_file()
    assert all(math.isfinite(run.summary["validation"][m]) for m in METRICS)


def test_cached_run_without_validation_still_loads_no_encoder_weights(tiny_model_dir, cache, tmp_path):  # noqa: F811
    run = train(compose(tiny_overrides(tiny_model_dir, str(cache), tmp_path / "run", "data=cached",
                                       "trainer.max_steps=1", "trainer.checkpoint_every=0")))
    assert run.base.vae.device.type == "meta" and run.base.text_encoder.device.type == "meta"


@pytest.mark.parametrize("fails", [False, True])
def test_encoders_visit_the_device_and_go_back_to_the_host_even_on_an_error(monkeypatch, fails):
    moves = []
    monkeypatch.setattr(nn.Module, "to", lambda self, device: moves.append((self, torch.device(device))) or self)
    base = SimpleNamespace(vae=nn.Linear(1, 1), text_encoder=nn.Linear(1, 1), text_encoder_2=None,
                           image_encoder=nn.Linear(1, 1))
    modules = [base.vae, base.text_encoder, base.image_encoder]
    device = torch.device("cuda", 0)
    monkeypatch.setattr(cached_validation.torch.cuda, "empty_cache", lambda: moves.append("emptied"))
    with pytest.raises(RuntimeError) if fails else torch.no_grad():
        with encoders_on(base, device):
            assert moves == [(m, device) for m in modules]
            if fails:
                raise RuntimeError("out of memory in validation")
    assert moves[3:] == [(m, HOST) for m in modules] + ["emptied"]
