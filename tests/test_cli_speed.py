"""`--help` of every command answers without importing torch, diffusers or transformers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers")
# Calls main(["--help"]) and then reports which of the heavy libraries got imported.
PROBE = """
import sys
from {module} import main
try:
    main(["--help"])
except SystemExit:
    pass
print("HEAVY:" + ",".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("module", ["instantstyle.generate", "instantstyle.evaluate", "instantstyle.probe_blocks",
                                    "train.export", "instantstyle.plan_memory"])
def test_help_imports_no_ml_library(module):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(module=module, heavy=HEAVY)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY:", proc.stdout


def test_usage_error_imports_no_ml_library(tmp_path):
    """A bad number is reported before torch is imported, too."""
    probe = ("import sys\nfrom instantstyle.generate import main\n"
             "rc = main(['--base', 'B', '--adapter', 'A', '--style-image', 'S', '--prompt', 'p', '--steps', '0',"
             f" '--out', {str(tmp_path / 'o.png')!r}])\n"
             f"print(rc, [m for m in {HEAVY!r} if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.stdout.strip() == "2 []" and proc.stderr.startswith("error: --steps"), proc.stdout + proc.stderr
