"""Shared fixtures: a tiny SDXL-shaped base built once per session, never downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread per process (subprocesses inherit it): with 2 OpenMP threads on a 2-core machine
# that is busy with anything else, tiny matmuls spin-wait and run ~100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """Path of a tiny SDXL-shaped diffusers folder (with image_encoder/), built once per session."""
    from data_tools.make_tiny_model import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny_base") / "base", seed=0))


@pytest.fixture()
def tiny_base(tiny_model_dir):
    """Freshly loaded frozen components of the tiny base (safe to mutate in a test)."""
    from instantstyle.models import load_base

    return load_base(tiny_model_dir)


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> str:
    """Folder of 32 synthetic 64 px samples in 4 shards (with manifest), written once per session."""
    from data_tools.synthetic import write_synthetic_shards

    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, num=32, size=64, per_shard=8)
    return str(out)
