"""Perplexity: exp(sum of next-token NLL / number of scored tokens).

`perplexity` scores packed rows (the trainer's held-out report); `sliding_perplexity` scores one long
text with windows of W tokens moved by S: each token x_j (j >= 1) is scored exactly once, in the
first window that holds it after the previous window's end, conditioned on the up to W-1 tokens
of that window before it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hylo_jax.errors import EvalError
from hylo_jax.eval.scoring import Batch, pack_rows, row_nll
from hylo_jax.eval.tokens import check_length


def perplexity(model, batch: Batch, batch_size: int = 1) -> float:
    """exp(mean next-token NLL over the batch's loss-masked tokens)."""
    nll, count = row_nll(model, batch, batch_size)
    return float(np.exp(nll.sum() / max(count.sum(), 1)))


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored index) of each window over n tokens; indices are global."""
    if not 1 <= stride < window:
        raise EvalError(f"perplexity stride must be in [1, window-1] = [1, {window - 1}], got {stride}")
    out, end, start = [], 1, 0
    while end < n:
        stop = min(start + window, n)
        out.append((start, stop, end))
        end, start = stop, start + stride
    return out


def sliding_perplexity(model, ids: Sequence[int], window: int, stride: int,
                       batch_size: int = 1) -> dict[str, float]:
    """{"ppl", "nll" (mean per token), "tokens" (scored)} of `ids` with sliding windows."""
    if len(ids) < 2:
        raise EvalError(f"perplexity needs at least 2 tokens of text, got {len(ids)}")
    spans = sliding_windows(len(ids), window, stride)
    width = max(e - s for s, e, _ in spans) - 1
    check_length(model, width, f"perplexity window {window}")
    batch = pack_rows([ids[s:e] for s, e, _ in spans], [first - s for s, _, first in spans], width)
    nll, count = row_nll(model, batch, batch_size)
    mean = float(nll.sum() / count.sum())
    return {"ppl": float(np.exp(mean)), "nll": mean, "tokens": int(count.sum())}
