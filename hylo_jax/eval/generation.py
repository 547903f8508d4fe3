"""Completions for evaluation through `hylo_jax.generate.generate`, in batches, and stop strings."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hylo_jax.generate import SamplingConfig, generate


def complete(model, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, stop_tokens: Sequence[int] = (),
             batch_size: int = 1, ragged: bool = False) -> list[list[int]]:
    """Continuations of every prompt, in input order, `batch_size` prompts per `generate` call.

    Unless `ragged`, a batch holds prompts of one length only (today's `generate` refuses ragged
    batches on models with recurrent layers; the chunked-prefill engine accepts them).
    """
    order = sorted(range(len(prompts)), key=lambda i: 0 if ragged else len(prompts[i]))
    groups = itertools.groupby(order, key=lambda i: 0 if ragged else len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for _, members in groups:
        members = list(members)
        for i in range(0, len(members), batch_size):
            chunk = members[i:i + batch_size]
            for j, tokens in zip(chunk, generate(model, [prompts[j] for j in chunk], cfg, stop_tokens), strict=True):
                out[j] = tokens
    return out


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    ends = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(ends)] if ends else text
