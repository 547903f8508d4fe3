"""The embedded default job end to end (slow: ~15 minutes on 2 CPU cores; run with -m slow)."""

import os
import subprocess
import sys

import pytest
import yaml


@pytest.mark.slow
def test_demo_upcycles_and_distils_smollm2(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}  # one CPU device, as a user
    proc = subprocess.run([sys.executable, "-m", "hylo_jax.cli", "demo", f"out={out}"], env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = yaml.safe_load((out / "results.yaml").read_text())
    assert results["student_ppl_after"] < results["student_ppl_before"] / 5
    assert "decode cache per token: 1,152 B vs teacher 23,040 B (5.0%)" in proc.stdout
