"""`hylo eval` end to end on a tiny saved model: table on stdout, results.json, ruler.png."""

import json

import pytest
from conftest import byte_tokenizer
from flax import nnx

from hylo_jax.checkpoint import save_model
from hylo_jax.cli import main
from hylo_jax.config import ModelConfig
from hylo_jax.models.transformer import CausalLM

CFG = ModelConfig(vocab_size=261, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    save_model(root / "model", CausalLM(CFG, rngs=nnx.Rngs(0)), CFG, tokenizer=byte_tokenizer())
    (root / "text.txt").write_text("Something is rotten in the state of Denmark. " * 8)
    (root / "mc.jsonl").write_text("\n".join(json.dumps(d) for d in [
        {"context": "The sky is", "choices": ["blue", "green"], "label": 0},
        {"goal": "Boil water", "sol1": "heat it", "sol2": "freeze it", "label": 0}]) + "\n")
    (root / "gsm.jsonl").write_text("\n".join(json.dumps({"question": f"What is {a} + 1?", "answer": f"#### {a + 1}"})
                                              for a in (3, 4)) + "\n")
    return root


def test_eval_end_to_end(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "--ckpt", str(folder / "model"), "--teacher", str(folder / "model"),
                 "--tasks", f"ruler,ppl,mc:{folder / 'mc.jsonl'},gsm8k:{folder / 'gsm.jsonl'}",
                 "--lengths", "512,768", "--samples", "2", "--out", str(out),
                 "eval.ruler_tasks=[niah_single_1,vt]", "eval.max_new_tokens=4", "eval.gsm8k_max_new_tokens=4",
                 "eval.batch_size=2", f"eval.ppl_text={folder / 'text.txt'}", "eval.ppl_window=64",
                 "eval.ppl_stride=32"]) == 0
    printed = capsys.readouterr().out
    assert "== model" in printed and "== teacher" in printed and "average" in printed and "perplexity" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["lengths"] == [512, 768]
    for name in ("model", "teacher"):
        res = results["models"][name]
        assert set(res["ruler"]) == {"niah_single_1", "vt", "average"}
        assert set(res["ruler"]["vt"]) == {"512", "768"} and len(res["ruler_samples"]) == 8
        assert res["ppl"]["tokens"] == len((folder / "text.txt").read_text()) - 1  # bytes - 1
        assert res[f"mc:{folder / 'mc.jsonl'}"]["docs"] == 2
        assert 0 <= res[f"gsm8k:{folder / 'gsm.jsonl'}"]["exact_match"] <= 1
    assert results["models"]["model"]["ppl"] == results["models"]["teacher"]["ppl"]
    assert (out / "ruler.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--tasks", "ruler,bleu"], "unknown eval task 'bleu'"),
    (["--tasks", "mc:/nonexistent.jsonl"], "/nonexistent.jsonl does not exist"),
    (["--tasks", "ruler", "eval.ruler_tasks=[niah_x]"], "unknown RULER task 'niah_x'"),
    (["--tasks", "ruler", "--lengths", "2000", "eval.ruler_tasks=[vt]"],
     r"RULER vt at length 2000 \(\+30 generated tokens\) needs 2030 positions, more than this model's "
     r"model.max_position_embeddings=1024; pass model.max_position_embeddings=2030"),
])
def test_bad_requests(folder, tmp_path, capsys, args, message):
    import re

    assert main(["eval", "--ckpt", str(folder / "model"), "--out", str(tmp_path), *args]) == 2
    assert re.search(message, capsys.readouterr().err)
