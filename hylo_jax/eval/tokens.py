"""Text -> token ids without special tokens, and the longest input a model accepts."""

from __future__ import annotations

from collections.abc import Sequence

from hylo_jax.errors import EvalError


def encode(tokenizer, text: str) -> list[int]:
    """The ids of `text` alone (no BOS/EOS)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_many(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """`encode` of each text, in one tokenizer call."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def bos(tokenizer) -> list[int]:
    """[bos_id] when the tokenizer puts a BOS before text by default, else []."""
    ids = tokenizer("a")["input_ids"]
    return [ids[0]] if tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else []


def check_length(model, n: int, what: str) -> None:
    """`EvalError` unless 0 < n <= model.cfg.max_position_embeddings."""
    if n <= 0:
        raise EvalError(f"{what} is empty (0 tokens)")
    limit = model.cfg.max_position_embeddings
    if n > limit:
        raise EvalError(f"{what} needs {n} positions, more than this model's model.max_position_embeddings="
                        f"{limit}; pass model.max_position_embeddings={n} (or more) to evaluate beyond it")
