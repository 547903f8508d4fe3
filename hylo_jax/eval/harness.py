"""Log-likelihood multiple choice over local jsonl files in lm-eval-harness task formats.

A document gives a context c_i and a continuation x_i per choice i (WinoGrande varies the context,
the others the continuation). With ll_i = log p(x_i | c_i) = sum over x_i's tokens of log p(token |
everything before it): acc = [argmax_i ll_i = gold], acc_norm = [argmax_i ll_i / chars(x_i) = gold]
(lm-eval's length normalisation; chars(x_i) counts the choice without its " " delimiter), both
averaged over documents. Contexts and continuations are tokenised separately (BOS + context ids,
continuation ids).

Formats, recognised by their keys: ARC {question, choices{text,label}, answerKey}, HellaSwag {ctx,
endings, label}, PIQA {goal, sol1, sol2, label}, WinoGrande {sentence with "_", option1, option2,
answer}, generic {context, choices, label}.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
from jaxtyping import Float

from hylo_jax.errors import EvalError
from hylo_jax.eval.scoring import pack_rows, row_nll
from hylo_jax.eval.tokens import bos, check_length, encode_many

BUCKET = 32  # rows are padded to a multiple of this, bounding the number of compiled shapes


@dataclasses.dataclass(frozen=True)
class MCDoc:
    contexts: tuple[str, ...]  # one per choice
    continuations: tuple[str, ...]
    label: int


def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    """(\"FILE:LINE\", object) for each non-blank line; `EvalError` naming the line if it is not a
    JSON object."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"data file {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise EvalError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"{path}:{n}", row))
    if not rows:
        raise EvalError(f"data file {path} has no lines")
    return rows


def _hellaswag_text(text: str) -> str:
    """lm-eval's HellaSwag cleanup: [title] markers to '. ', other [tags] dropped, double spaces."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _arc(r):
    labels = list(r["choices"]["label"])
    return [f"Question: {r['question']}\nAnswer:"], [" " + t for t in r["choices"]["text"]], labels.index(
        r["answerKey"])


def _hellaswag(r):
    ctx = (r["activity_label"] + ": " if r.get("activity_label") else "") + r["ctx"]
    return [_hellaswag_text(ctx)], [" " + _hellaswag_text(e) for e in r["endings"]], int(r["label"])


def _piqa(r):
    return [f"Question: {r['goal']}\nAnswer:"], [" " + r["sol1"], " " + r["sol2"]], int(r["label"])


def _winogrande(r):
    cut = r["sentence"].index("_")
    head, tail = r["sentence"][:cut], r["sentence"][cut + 1:].strip()
    return [head + r["option1"], head + r["option2"]], [" " + tail] * 2, int(r["answer"]) - 1


def _generic(r):
    return [r["context"]], [" " + c for c in r["choices"]], int(r["label"])


FORMATS = {"arc": ({"question", "choices", "answerKey"}, _arc), "hellaswag": ({"ctx", "endings", "label"}, _hellaswag),
           "piqa": ({"goal", "sol1", "sol2", "label"}, _piqa),
           "winogrande": ({"sentence", "option1", "option2", "answer"}, _winogrande),
           "generic": ({"context", "choices", "label"}, _generic)}


def parse_doc(where: str, row: dict) -> MCDoc:
    """The document of one jsonl object; `EvalError` naming `where` if it fits no format."""
    fmt = [name for name, (keys, _) in FORMATS.items() if keys <= set(row)]
    if not fmt:
        raise EvalError(f"{where}: keys {sorted(row)} match no multiple-choice format; expected one of "
                        + "; ".join(f"{n} {sorted(k)}" for n, (k, _) in FORMATS.items()))
    try:
        contexts, continuations, label = FORMATS[fmt[0]][1](row)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise EvalError(f"{where}: malformed {fmt[0]} document ({type(e).__name__}: {e})") from None
    contexts = tuple(contexts) * (len(continuations) if len(contexts) == 1 else 1)
    if not 0 <= label < len(continuations) or len(continuations) < 2:
        raise EvalError(f"{where}: label {label} does not name one of {len(continuations)} choices")
    return MCDoc(contexts, tuple(continuations), label)


def choice_loglikelihoods(model, tokenizer, docs: list[tuple[str, MCDoc]],
                          batch_size: int = 8) -> list[Float[np.ndarray, "choices"]]:
    """ll_i of every choice of every document, `batch_size` (context, choice) rows per forward."""
    rows, starts, first = [], [], bos(tokenizer)
    for where, doc in docs:
        ctx, cont = (encode_many(tokenizer, list(texts)) for texts in (doc.contexts, doc.continuations))
        for i, (c, x) in enumerate(zip(ctx, cont)):
            c = first + c
            if not c or not x:
                raise EvalError(f"{where}: choice {i} has an empty {'context' if not c else 'continuation'}")
            check_length(model, len(c) + len(x) - 1, f"{where} choice {i}")
            rows.append(c + x)
            starts.append(len(c))
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    ll = np.zeros(len(rows))
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        width = -(-(len(rows[chunk[0]]) - 1) // BUCKET) * BUCKET
        nll, _ = row_nll(model, pack_rows([rows[r] for r in chunk], [starts[r] for r in chunk], width), batch_size)
        ll[chunk] = -nll
    sizes = np.cumsum([len(doc.continuations) for _, doc in docs])[:-1]
    return np.split(ll, sizes)


def evaluate_mc(model, tokenizer, path: str | Path, batch_size: int = 8, limit: int = 0) -> dict:
    """{"acc", "acc_norm", "docs", "chosen", "chosen_norm"} of a jsonl file (its first `limit` documents, 0 = all)."""
    rows = read_jsonl(path)[: limit or None]
    docs = [(where, parse_doc(where, row)) for where, row in rows]
    lls = choice_loglikelihoods(model, tokenizer, docs, batch_size)
    chosen = [int(np.argmax(ll)) for ll in lls]
    chars = [np.array([max(len(x) - 1, 1) for x in doc.continuations]) for _, doc in docs]
    normed = [int(np.argmax(ll / n)) for ll, n in zip(lls, chars)]
    gold = np.array([doc.label for _, doc in docs])
    return {"acc": float(np.mean(np.array(chosen) == gold)), "acc_norm": float(np.mean(np.array(normed) == gold)),
            "docs": len(docs), "chosen": chosen, "chosen_norm": normed}
