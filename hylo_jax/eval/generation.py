"""Completions for evaluation through `hylo_jax.generate.generate`, in batches, and stop strings."""

from __future__ import annotations

from collections.abc import Sequence

from hylo_jax.generate import SamplingConfig, generate


def complete(model, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, stop_tokens: Sequence[int] = (),
             batch_size: int = 1) -> list[list[int]]:
    """Continuations of every prompt, in input order, `batch_size` prompts per `generate` call; prompts
    are sorted by length first, so that the rows of a batch need little right padding."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        for j, tokens in zip(rows, generate(model, [prompts[j] for j in rows], cfg, stop_tokens), strict=True):
            out[j] = tokens
    return out


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    ends = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(ends)] if ends else text
