"""GSM8K-style exact match: greedy answers to "Question: ...\\nAnswer:" prompts (after an optional
few-shot prefix), cut at stop strings; the final number of the answer is compared with the gold
number after "#### " (as decimals: commas, "$" and a trailing "." ignored).

The predicted number is the one after "####" when the model writes one (lm-eval's strict match),
else the last number in the answer (its flexible extract).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from hylo_jax.errors import EvalError
from hylo_jax.eval.generation import complete, cut_at_stop
from hylo_jax.eval.harness import read_jsonl
from hylo_jax.eval.tokens import bos, check_length, encode
from hylo_jax.generate import SamplingConfig

STOPS = ("Question:", "\n\n")
NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def _decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", "").replace("$", "").rstrip("."))
    except InvalidOperation:
        return None


def extract_answer(text: str) -> Decimal | None:
    """The number after "####", else the last number in `text`; None if there is none."""
    strict = re.search(r"####\s*(" + NUMBER + ")", text)
    if strict:
        return _decimal(strict.group(1))
    numbers = re.findall(NUMBER, text)
    return _decimal(numbers[-1]) if numbers else None


def gold_answer(where: str, row: dict) -> Decimal:
    """The number after "####" in a document's "answer"; `EvalError` naming `where` otherwise."""
    answer = row.get("answer")
    value = re.search(r"####\s*(" + NUMBER + ")", answer) if isinstance(answer, str) else None
    if not isinstance(row.get("question"), str) or value is None:
        raise EvalError(f'{where}: a GSM8K document needs "question" and an "answer" ending in "#### NUMBER"')
    return _decimal(value.group(1))


def prompt(question: str, fewshot: str = "") -> str:
    return f"{fewshot}Question: {question}\nAnswer:"


def fewshot_prefix(path: str | Path, shots: int) -> str:
    """The first `shots` documents of a GSM8K jsonl file as solved examples."""
    rows = read_jsonl(path)[:shots]
    for where, row in rows:
        gold_answer(where, row)
    return "".join(f"{prompt(row['question'])} {row['answer']}\n\n" for _, row in rows)


def evaluate_gsm8k(model, tokenizer, path: str | Path, *, fewshot: str = "", max_new_tokens: int = 256,
                   batch_size: int = 8, limit: int = 0) -> dict:
    """{"exact_match", "docs", "answers"} of a GSM8K jsonl file (first `limit` documents, 0 = all)."""
    rows = read_jsonl(path)[: limit or None]
    golds = [gold_answer(where, row) for where, row in rows]
    prompts = [bos(tokenizer) + encode(tokenizer, prompt(row["question"], fewshot)) for _, row in rows]
    for (where, _), ids in zip(rows, prompts):
        check_length(model, len(ids) + max_new_tokens, f"{where} (prompt + max_new_tokens)")
    stop = [t for t in [tokenizer.eos_token_id] if t is not None]
    outs = complete(model, prompts, SamplingConfig(max_new_tokens=max_new_tokens), stop, batch_size)
    answers = [cut_at_stop(tokenizer.decode(out, skip_special_tokens=True), STOPS) for out in outs]
    hits = [extract_answer(a) == g for a, g in zip(answers, golds)]
    return {"exact_match": sum(hits) / len(hits), "docs": len(hits), "answers": answers}
