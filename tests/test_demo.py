"""The embedded default job end to end (slow: ~15 minutes on 2 CPU cores; run with -m slow)."""

import pytest
import yaml

from hylo_jax.cli import main


@pytest.mark.slow
def test_demo_upcycles_and_distils_smollm2(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", f"out={out}"]) == 0
    results = yaml.safe_load((out / "results.yaml").read_text())
    assert results["student_ppl_after"] < results["student_ppl_before"] / 5
    assert "decode cache per token: 1,152 B vs teacher 23,040 B (5.0%)" in capsys.readouterr().out
