"""Packing tokenised documents into fixed-length rows, as checkpointable grain transforms.

A document of n tokens becomes n - 1 next-token pairs (`tokens[i]` predicts `targets[i]`) *before*
packing, so no target ever crosses a document boundary and cutting a document loses no target.
Documents longer than `seq_len` pairs are cut into consecutive pieces of `seq_len` (the last one
shorter); pieces are placed by grain's first-fit packing over `bins` rows at a time: each piece goes
into the first row with room, and when one fits nowhere, all rows are emitted and refilled.
A row holds:
  tokens, targets   the pairs, 0 where padding
  segment_ids       1, 2, 3... per piece within the row, 0 for padding
  positions         0, 1, 2... restarting at every piece, 0 for padding
  loss_mask         1 where the target is trained on (0 on padding, and on non-assistant chat tokens)
"""

from __future__ import annotations

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset, FlatMapIterDataset, FlatMapTransform
from jaxtyping import Bool, Int

from hylo_jax.data.sources import DataError

ROW_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
Pairs = dict[str, Int[np.ndarray, "n"]]  # tokens, targets, loss_mask of one document or piece


def next_token_pairs(ids: Int[np.ndarray, "n"], trained: Bool[np.ndarray, "n"]) -> Pairs:
    """The n - 1 pairs of a document; `trained[j]` says whether token j counts as a target."""
    ids = np.asarray(ids, np.int32)
    return {"tokens": ids[:-1], "targets": ids[1:], "loss_mask": np.asarray(trained[1:], np.int32)}


class _Pieces(FlatMapTransform):
    """Cuts a document's pairs into pieces of at most `seq_len`; an empty document gives none.

    A whole epoch of empty documents (`patience` in a row) would spin forever: it is a `DataError`.
    """

    def __init__(self, seq_len: int, patience: int):
        self.seq_len, self.patience, self.empty_run = seq_len, patience, 0

    def flat_map(self, doc: Pairs) -> list[Pairs]:
        n = len(doc["tokens"])
        self.empty_run = 0 if n else self.empty_run + 1
        if self.empty_run > self.patience:
            raise DataError(f"{self.patience} documents in a row have fewer than 2 tokens: nothing to train on")
        return [{k: v[s:s + self.seq_len] for k, v in doc.items()} for s in range(0, n, self.seq_len)]


def _row(packed: dict[str, np.ndarray]) -> dict[str, Int[np.ndarray, "t"]]:
    names = {"segment_ids": "tokens_segment_ids", "positions": "tokens_positions"}
    return {k: packed[names.get(k, k)].astype(np.int32) for k in ROW_KEYS}


def pack(docs: grain.IterDataset, seq_len: int, bins: int, patience: int, max_docs: int = 0) -> grain.IterDataset:
    """Rows of `seq_len` (the module docstring's layout) from documents' `next_token_pairs`.

    `patience`: how many documents in a row may be empty (< 2 tokens) before it is an error.
    `max_docs`: most pieces in one row (0: no bound).
    """
    pieces = FlatMapIterDataset(docs, _Pieces(seq_len, patience))
    rows = FirstFitPackIterDataset(
        pieces, length_struct={k: seq_len for k in ("tokens", "targets", "loss_mask")},
        num_packing_bins=bins, shuffle_bins=False, meta_features=("targets", "loss_mask"),
        max_sequences_per_bin=max_docs or None)
    return rows.map(_row)
