"""Masked next-token negative log-likelihood of padded token rows: the scoring core of perplexity
and of multiple choice.

A row of ids x_0..x_{n-1} becomes inputs x_0..x_{n-2} and targets x_1..x_{n-1}; the NLL of row r is
sum_j m_j * -log p(x_{j+1} | x_0..x_j) with m_j = 1 for scored targets. Rows are right-padded, so
causal attention and recurrent mixers never see the padding before a real token.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Float

from hylo_jax.train.losses import token_nll

Batch = dict[str, np.ndarray]  # tokens, targets, positions, segment_ids, loss_mask: [b, t] int32


@jax.jit
def _row_nll(graphdef, state, batch):
    model = nnx.merge(graphdef, state)
    logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(token_nll(logits, batch["targets"]) * mask, axis=1), jnp.sum(mask, axis=1)


def pack_rows(rows: Sequence[Sequence[int]], scored_from: Sequence[int], width: int) -> Batch:
    """Rows of ids right-padded to `width` inputs; token i of row r is scored iff i >= scored_from[r]
    (i >= 1: the first token has no prediction)."""
    b = len(rows)
    tokens, targets, mask = (np.zeros((b, width), np.int32) for _ in range(3))
    for r, (ids, first) in enumerate(zip(rows, scored_from, strict=True)):
        n = len(ids) - 1
        tokens[r, :n], targets[r, :n] = ids[:-1], ids[1:]
        mask[r, max(first, 1) - 1: n] = 1
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (b, width)).copy()
    return dict(tokens=tokens, targets=targets, positions=positions, segment_ids=np.ones((b, width), np.int32),
                loss_mask=mask)


def row_nll(model, batch: Batch, batch_size: int = 1) -> tuple[Float[np.ndarray, "r"], Float[np.ndarray, "r"]]:
    """(sum of masked NLL, number of scored tokens) per row, `batch_size` rows per forward (the last
    group is padded with unscored rows so that every forward has the same shape)."""
    graphdef, state = nnx.split(model)
    n = len(batch["tokens"])
    nll, count = np.zeros(n), np.zeros(n)
    for i in range(0, n, batch_size):
        part = {k: v[i:i + batch_size] for k, v in batch.items()}
        pad = batch_size - len(part["tokens"])
        if pad:
            part = {k: np.concatenate([v, np.zeros((pad, v.shape[1]), v.dtype)]) for k, v in part.items()}
        k = batch_size - pad
        s, c = _row_nll(graphdef, state, {key: jnp.asarray(v) for key, v in part.items()})
        nll[i:i + k], count[i:i + k] = np.asarray(s)[:k], np.asarray(c)[:k]
    return nll, count
