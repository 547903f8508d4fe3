"""Perplexity, multiple choice and GSM8K on tiny models with the byte tokenizer: a hybrid (GDN + MLA)
where right padding must not change a score, an attention-only teacher where many rows are
recomputed one by one."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import byte_tokenizer
from flax import nnx

from hylo_jax.config import ModelConfig
from hylo_jax.convert.upcycle import upcycle
from hylo_jax.errors import EvalError
from hylo_jax.eval import generation, gsm8k
from hylo_jax.eval.harness import choice_loglikelihoods, evaluate_mc, parse_doc, read_jsonl
from hylo_jax.eval.perplexity import sliding_perplexity, sliding_windows
from hylo_jax.eval.scoring import pack_rows, row_nll
from hylo_jax.eval.tokens import check_length
from hylo_jax.models.gated_deltanet import GDNConfig
from hylo_jax.models.hybrid import HybridConfig, ModelSpec
from hylo_jax.models.mla import MLAConfig
from hylo_jax.models.transformer import CausalLM

CFG = ModelConfig(vocab_size=261, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=256)
PLAN = HybridConfig(mla_layers=(1,), linear="gdn",
                    mla=MLAConfig(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=4, qk_rope_head_dim=4,
                                  v_head_dim=8),
                    gdn=GDNConfig(num_heads=2, head_k_dim=8, chunk_size=8))
TOK = byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    return CausalLM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def hybrid(model):
    return upcycle(model, ModelSpec.create(CFG, PLAN), seed=0)


@jax.jit
def _logits(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def logprobs(model, ids, width: int = 0) -> np.ndarray:
    """log p(ids[j] | ids[:j]) for j >= 1, from a forward of this row alone (right-padded to `width`)."""
    n = len(ids) - 1
    tokens = np.zeros((1, width or n), np.int32)
    tokens[0, :n] = ids[:-1]
    logp = jax.nn.log_softmax(_logits(*nnx.split(model), jnp.asarray(tokens))[0, :n], axis=-1)
    return np.asarray(jnp.take_along_axis(logp, jnp.asarray(ids[1:])[:, None], axis=-1)[:, 0])


def test_sliding_windows_score_each_token_once():
    for n, w, s in [(100, 16, 5), (100, 16, 15), (17, 16, 8), (5, 16, 8)]:
        spans = sliding_windows(n, w, s)
        scored = []
        for start, end, first in spans:
            assert end - start <= w and start < first <= end
            scored += range(first, end)
        assert scored == list(range(1, n))
    with pytest.raises(EvalError, match="stride"):
        sliding_windows(10, 8, 8)


IDS = TOK("To be, or not to be, that is the question.")["input_ids"]


def test_perplexity_equals_direct(model):
    """W >= text length: one window, the plain mean NLL."""
    direct = -logprobs(model, IDS).mean()
    whole = sliding_perplexity(model, IDS, window=64, stride=32)
    assert whole["tokens"] == len(IDS) - 1
    assert whole["nll"] == pytest.approx(direct, rel=1e-5) and whole["ppl"] == pytest.approx(np.exp(direct), rel=1e-5)


def test_right_padding_changes_no_score_of_a_hybrid(hybrid):
    direct = -logprobs(hybrid, IDS).mean()
    nll, count = row_nll(hybrid, pack_rows([IDS], [1], width=64))
    assert count[0] == len(IDS) - 1 and nll[0] / count[0] == pytest.approx(direct, rel=1e-5)


def test_sliding_perplexity_equals_windows_one_by_one(model):
    windowed = sliding_perplexity(model, IDS, window=16, stride=6, batch_size=3)
    nll = [-logprobs(model, IDS[s:e], 64)[first - s - 1:] for s, e, first in sliding_windows(len(IDS), 16, 6)]
    assert windowed["tokens"] == len(IDS) - 1 == sum(map(len, nll))
    assert windowed["nll"] == pytest.approx(np.concatenate(nll).mean(), rel=1e-5)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


DOCS = [
    {"question": "Which is a colour?", "choices": {"text": ["red", "table", "seven"], "label": ["A", "B", "C"]},
     "answerKey": "A"},
    {"ctx": "A man sits down. He", "endings": ["reads a book.", "flies [title] away.", "eats."], "label": "1",
     "activity_label": "Reading"},
    {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "shout at it", "label": 0},
    {"sentence": "The cup fell on the floor because _ was slippery.", "option1": "the cup", "option2": "the floor",
     "answer": "2"},
    {"context": "One plus one is", "choices": ["two", "three", "a very long wrong answer"], "label": 0},
]


def test_multiple_choice_is_argmax_of_loglikelihoods(model, tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", DOCS)
    docs = [(w, parse_doc(w, r)) for w, r in read_jsonl(path)]
    assert [d.label for _, d in docs] == [0, 1, 0, 1, 0]
    assert docs[3][1].contexts == ("The cup fell on the floor because the cup", "The cup fell on the floor "
                                   "because the floor") and docs[3][1].continuations == (" was slippery.",) * 2
    assert docs[1][1].contexts[0] == "Reading: A man sits down. He"
    assert docs[1][1].continuations[1] == " flies. away."
    lls = choice_loglikelihoods(model, TOK, docs, batch_size=4)  # padded batches, sorted by length
    for (_, doc), ll in zip(docs, lls):
        pairs = [(TOK(c)["input_ids"], TOK(x)["input_ids"]) for c, x in zip(doc.contexts, doc.continuations)]
        independent = [logprobs(model, c + x, 64)[len(c) - 1:].sum() for c, x in pairs]
        np.testing.assert_allclose(ll, independent, rtol=1e-5, atol=1e-5)
    result = evaluate_mc(model, TOK, path, batch_size=4)
    assert result["chosen"] == [int(np.argmax(ll)) for ll in lls]
    chars = [[len(x) - 1 for x in doc.continuations] for _, doc in docs]  # without the " " delimiter
    assert result["chosen_norm"] == [int(np.argmax(ll / np.array(n))) for ll, n in zip(lls, chars)]
    # labels set to the model's own choices: accuracy 1
    relabelled = [dict(r) for r in DOCS]
    for r, c in zip(relabelled, result["chosen"]):
        key = "answerKey" if "answerKey" in r else "answer" if "option1" in r else "label"
        r[key] = {"answerKey": "ABC"[c], "answer": str(c + 1), "label": c}[key]
    own = evaluate_mc(model, TOK, write_jsonl(tmp_path / "own.jsonl", relabelled), batch_size=4)
    assert own["acc"] == 1.0 and own["docs"] == 5


def test_bad_requests(model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(DOCS[0]) + "\n{not json\n")
    with pytest.raises(EvalError, match=f"{bad}:2: malformed JSON"):
        read_jsonl(bad)
    with pytest.raises(EvalError, match=r"bad2.jsonl:1: keys \['foo'\] match no multiple-choice format"):
        evaluate_mc(model, TOK, write_jsonl(tmp_path / "bad2.jsonl", [{"foo": 1}]))
    with pytest.raises(EvalError, match="label 5 does not name one of 3 choices"):
        evaluate_mc(model, TOK, write_jsonl(tmp_path / "bad3.jsonl", [{**DOCS[4], "label": 5}]))
    with pytest.raises(EvalError, match="empty context"):
        evaluate_mc(model, TOK, write_jsonl(tmp_path / "bad4.jsonl", [{**DOCS[4], "context": ""}]))
    with pytest.raises(EvalError, match="more than this model's model.max_position_embeddings=256"):
        evaluate_mc(model, TOK, write_jsonl(tmp_path / "long.jsonl", [{**DOCS[4], "context": "x" * 300}]))
    with pytest.raises(EvalError, match="is empty"):
        check_length(model, 0, "prompt")
    with pytest.raises(EvalError, match="perplexity window 512 needs 511 positions"):
        sliding_perplexity(model, list(range(600)), window=512, stride=256)


def test_gsm8k_extraction():
    assert gsm8k.extract_answer("3 + 4 = 7 apples. #### 7") == 7
    assert gsm8k.extract_answer("She pays $1,234.50.") == gsm8k.extract_answer("#### 1234.5")
    assert gsm8k.extract_answer("it is -3, not 4") == 4 and gsm8k.extract_answer("so -3") == -3
    assert gsm8k.extract_answer("no idea") is None
    assert gsm8k.gold_answer("f:1", {"question": "q", "answer": "2 * 3 = 6\n#### 6"}) == 6
    with pytest.raises(EvalError, match='f:1: a GSM8K document needs "question" and an "answer"'):
        gsm8k.gold_answer("f:1", {"question": "q", "answer": "6"})
    assert generation.cut_at_stop(" 5 apples\n\nQuestion: next", gsm8k.STOPS) == " 5 apples"


def test_gsm8k_scoring(model, tmp_path, monkeypatch):
    rows = [{"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a, b in [(1, 2), (10, 20), (100, 200)]]
    path = write_jsonl(tmp_path / "gsm.jsonl", rows)
    fewshot = gsm8k.fewshot_prefix(path, 2)
    assert fewshot.startswith("Question: What is 1 + 2?\nAnswer: 1 + 2 = 3\n#### 3\n\nQuestion: What is 10")
    replies = [" 1 + 2 = 3\n#### 3\n\nQuestion: What is 5 + 5?\nAnswer: #### 10", " It is 30.", " #### 299"]
    seen = {}

    def fake_complete(model, prompts, cfg, stop, batch_size):
        seen["prompts"] = prompts
        return [TOK(r)["input_ids"] for r in replies]

    monkeypatch.setattr(gsm8k, "complete", fake_complete)
    result = gsm8k.evaluate_gsm8k(model, TOK, path, fewshot=fewshot, max_new_tokens=8)
    assert result["exact_match"] == pytest.approx(2 / 3) and result["answers"][0] == " 1 + 2 = 3\n#### 3"
    assert TOK.decode(seen["prompts"][2]) == fewshot + "Question: What is 100 + 200?\nAnswer:"


def test_complete_batches_by_length_and_keeps_order(monkeypatch):
    calls = []

    def fake_generate(model, prompts, cfg, stop):
        calls.append([len(p) for p in prompts])
        return [[len(p)] for p in prompts]

    monkeypatch.setattr(generation, "generate", fake_generate)
    prompts = [[1] * n for n in (3, 5, 3, 3, 5)]
    assert generation.complete(None, prompts, None, batch_size=2) == [[3], [5], [3], [3], [5]]
    assert calls == [[3, 3], [3, 5], [5]]


def test_ruler_run_scores_right_answers_100(monkeypatch):
    """The RULER pipeline (samples -> completions -> decode -> metric) with a reader that copies the
    needles' values and the chain's variables out of each prompt."""
    import re
    import types

    from hylo_jax.eval import runner
    from hylo_jax.eval.config import EvalConfig

    def reader(model, prompts, cfg, stop, batch_size):
        texts = [TOK.decode(p) for p in prompts]
        return [TOK(" ".join(re.findall(r"is: (\d+)\.", t) + re.findall(r"VAR (\w+) =", t)))["input_ids"]
                for t in texts]

    monkeypatch.setattr(runner, "complete", reader)
    stub = types.SimpleNamespace(cfg=types.SimpleNamespace(max_position_embeddings=1024))
    cfg = EvalConfig(lengths=(500, 600), samples=3, ruler_tasks=("niah_single_1", "vt"), max_new_tokens=8)
    scores, records = runner.run_ruler(stub, TOK, cfg)
    assert scores == {task: {500: 100.0, 600: 100.0} for task in ("niah_single_1", "vt", "average")}
    assert len(records) == 12 and records[0]["prediction"]
