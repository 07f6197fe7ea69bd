"""Library notices nobody can act on are dropped from runs; everything else those libraries say still shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Logs one record per (logger, message) after quiet_libraries(quantizing=Q); prints the ones that got through.
PROBE = """
import json, logging, sys
from instantstyle.quiet import quiet_libraries
quiet_libraries(quantizing={quantizing})
seen = []
class Keep(logging.Handler):
    def emit(self, record):
        seen.append([record.name, record.getMessage()])
logging.getLogger().addHandler(Keep())
for name, message in json.loads(sys.argv[1]):
    logging.getLogger(name).warning(message)
print(json.dumps(seen))
"""
RECORDS = [
    ["torchao", "Failed to load /x/_C_mxfp8.so: Could not load this library"],
    ["torchao.kernel.intmm", "Warning: Detected no triton, on systems without Triton certain kernels will not work"],
    ["diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects. This may affect …"],
    ["torch.utils._pytree", "<enum 'KernelPreference'> is an Enum subclass … Calling register_constant() is deprecated"],
    ["transformers.utils.import_utils", "`CLIPImageProcessor` requires torchvision (not installed); falling back"],
    ["torchao", "a torchao warning nobody has silenced"],
    ["diffusers.models.modeling_utils", "Some weights were not initialized"],
]


def passed_through(quantizing: bool) -> list[list[str]]:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(quantizing=quantizing), json.dumps(RECORDS)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_only_the_known_notices_are_dropped():
    assert passed_through(quantizing=False) == [RECORDS[5], RECORDS[6]]


def test_a_quantizing_run_keeps_what_torchao_says_about_its_kernels():
    assert passed_through(quantizing=True) == [*RECORDS[:3], RECORDS[5], RECORDS[6]]


@pytest.mark.parametrize("module", ["data_tools.precompute", "instantstyle.plan_memory", "data_tools.make_tiny_model",
                                    "data_tools.make_tiny_flux"])
def test_tools_that_load_or_build_a_base_are_quiet_with_every_test_extra_installed(module, tmp_path):
    """diffusers imports torchao when it is installed: its notices must not reach the user (it is in [test])."""
    pytest.importorskip("torchao")
    from data_tools.make_tiny_model import save_tiny_model
    from data_tools.synthetic import main as make_shards

    base = save_tiny_model(tmp_path / "base")
    make_shards(["--out", str(tmp_path / "shards"), "--num", "4", "--size", "32"])
    args = {"data_tools.precompute": ["--base", str(base), "--shards", str(tmp_path / "shards" / "*.tar"),
                                      "--out", str(tmp_path / "cache"), "--resolution", "32"],
            "instantstyle.plan_memory": ["--base", str(base)],
            "data_tools.make_tiny_model": ["--out", str(tmp_path / "made")],
            "data_tools.make_tiny_flux": ["--out", str(tmp_path / "made")]}[module]
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    noisy = [line for line in (proc.stdout + proc.stderr).splitlines()
             if any(word in line for word in ("warn", "Warn", "WARN", "Failed to load", "Unable to import"))]
    assert noisy == [], noisy


def test_the_benchmarks_package_is_quiet_at_import():
    """bench_gpu imports diffusers at the top: the package's filters come first (gpu_check imports it in-process)."""
    pytest.importorskip("torchao")
    proc = subprocess.run([sys.executable, "-c", "import benchmarks.bench_gpu, benchmarks.bench_train"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr


def test_loading_a_base_by_hub_id_does_not_warn_about_huggingface_hub_arguments(tmp_path):
    """diffusers' load_config passes huggingface_hub a deprecated argument: every run from a hub id warned."""
    script = ("from instantstyle.quiet import quiet_libraries\n"
              "quiet_libraries()\n"
              "import warnings\n"
              "from diffusers import UNet2DConditionModel\n"
              "try:\n"
              "    UNet2DConditionModel.load_config('someone/not-downloaded', subfolder='unet')\n"
              "except OSError:\n"
              "    pass\n"
              "warnings.warn('a warning nobody has silenced', UserWarning)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "local_dir_use_symlinks" not in proc.stderr and "a warning nobody has silenced" in proc.stderr
