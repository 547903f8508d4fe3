"""The embedded default job: the real SmolLM2-135M-Instruct teacher, imported offline, answers."""

import pytest

from hylo_jax.cli import main

pytestmark = pytest.mark.demo


def test_demo_imports_smollm2_and_answers_paris(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "smollm2")]) == 0
    out = capsys.readouterr().out
    assert "A: " in out and "Paris" in out.split("A: ", 1)[1], out
    # the folder is reused: a second run loads the saved checkpoint instead of re-importing
    assert main(["generate", "--ckpt", str(tmp_path / "smollm2"), "--prompt",
                 "What is the capital of Germany?"]) == 0
    assert "Berlin" in capsys.readouterr().out
