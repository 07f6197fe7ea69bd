"""No checkpoint or export ever holds diverged weights: non-finite ones, or finite ones that make the loss so.

``optim.lr=1e30`` without clipping moves the weights to ~1e30 in one step (finite, black on every
image); the steps after it are skipped as non-finite, but the weights stay. Training probes the
weights before every write (train/divergence.py); ``train.export`` and the library export refuse
non-finite and exploded tensors; generate warns about a file that holds them.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from instantstyle.errors import AdapterFileError
from tests.helpers import tiny_overrides
from train.config import compose
from train.divergence import DivergedWeights
from train.training import train


@pytest.mark.parametrize("extra", [[], ["trainer.ema=0.5"]], ids=["live", "ema"])
def test_exploded_weights_stop_the_run_before_any_checkpoint_holds_them(tiny_model_dir, shards, tmp_path, extra):
    out = tmp_path / "run"
    cfg = compose(tiny_overrides(tiny_model_dir, shards, out, "trainer.max_steps=10", "trainer.checkpoint_every=5",
                                 "optim.lr=1e30", "trainer.max_grad_norm=null", *extra))
    with pytest.raises(DivergedWeights, match="refusing to write the checkpoint at step 5") as err:
        train(cfg)
    assert "\n" not in str(err.value) and "inf/NaN loss" in str(err.value)
    assert not (out / "ip-adapter.safetensors").exists()
    assert not list((out / "checkpoints").glob("checkpoint-*")) if (out / "checkpoints").exists() else True


def test_exploded_weights_are_never_exported(tiny_model_dir, shards, tmp_path):
    """With no checkpoint before the end, the export is what the probe refuses."""
    out = tmp_path / "run"
    cfg = compose(tiny_overrides(tiny_model_dir, shards, out, "trainer.max_steps=3", "trainer.checkpoint_every=0",
                                 "optim.lr=1e30", "trainer.max_grad_norm=null"))
    with pytest.raises(DivergedWeights, match="refusing to write the checkpoint at step 3"):
        train(cfg)  # the last step's checkpoint comes before the export; neither is written
    assert not (out / "ip-adapter.safetensors").exists() and not list(out.rglob("*.safetensors"))


def test_probing_the_weights_changes_no_training_state(tiny_model_dir, shards, tmp_path):
    """A run that checkpoints every step (one probe each) trains the same weights as one that never does."""
    runs = []
    for name, every in (("probed", "1"), ("plain", "0")):
        run = train(compose(tiny_overrides(tiny_model_dir, shards, tmp_path / name, "trainer.max_steps=3",
                                           f"trainer.checkpoint_every={every}", "optim.lr=1e-3")))
        runs.append(load_file(str(tmp_path / name / "ip-adapter.safetensors")))
        assert run.probe_batch is not None
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_library_export_refuses_exploded_and_nonfinite_weights(tmp_path):
    from instantstyle.export import write_adapter_file

    for value, needle in ((float("nan"), "NaN or inf"), (1e30, r"reaches 1e\+30")):
        tensors = {"image_proj.proj.weight": torch.full((2, 2), value)}
        with pytest.raises(AdapterFileError, match=needle) as err:
            write_adapter_file(tensors, {}, tmp_path / "a.safetensors")
        assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []


def test_reading_an_exploded_adapter_file_warns(tmp_path, caplog):
    from safetensors.torch import save_file

    from instantstyle.export import read_adapter_file

    save_file({"image_proj.proj.weight": torch.full((2, 2), 1e30)}, str(tmp_path / "a.safetensors"))
    with caplog.at_level(logging.WARNING):
        read_adapter_file(tmp_path / "a.safetensors")
    assert "diverged" in caplog.text and "1e+30" in caplog.text
