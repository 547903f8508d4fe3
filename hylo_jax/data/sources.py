"""Document sources: random-access sequences of documents, read lazily by index.

A document is a string, or with `chat` a list of `{"role", "content"}` messages. Every source is a
`collections.abc.Sequence`, so grain can shard, shuffle and resume it by index:
  text         one document per file (the whole file, UTF-8)
  jsonl        one JSON object per non-empty line; the document is field `text_field` (chat: `messages`)
  parquet      one row per document, column `text_field` (chat: `messages`)
  arrayrecord  one record per document: a UTF-8 JSON object (field as for jsonl) or plain UTF-8 text
  tfds         `tfds.data_source(tfds_name, split=tfds_split)`, field as for jsonl
  shakespeare  the bundled plays, one per document (`hylo_jax.data.shakespeare`)
"""

from __future__ import annotations

import bisect
import glob
import json
import mmap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hylo_jax.data import shakespeare
from hylo_jax.errors import ConfigError, HyloError

if TYPE_CHECKING:
    from hylo_jax.data.pipeline import DataConfig

Document = str | list[dict[str, str]]
BLOCK = 1 << 26


class DataError(HyloError, ValueError):
    """A record cannot be turned into a document: bad JSON or UTF-8, a missing field, a bad chat."""


def expand(patterns: Sequence[str]) -> list[Path]:
    """Files named by `patterns` (paths or globs, `**` included), in order; each must match."""
    files: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not found:
                raise ConfigError(f"data.paths: no file matches {pattern!r}")
            files.extend(found)
        elif Path(pattern).is_file():
            files.append(Path(pattern))
        else:
            raise ConfigError(f"data.paths: {pattern} does not exist")
    return files


def to_document(record: Any, field: str, chat: bool, where: str) -> Document:
    """The document of a raw record (mapping, string or bytes); `where` names it in errors."""
    if isinstance(record, Mapping):
        if field not in record:
            raise DataError(f"{where}: no field {field!r} (fields: {sorted(record)})")
        record = record[field]
    if isinstance(record, bytes):
        try:
            record = record.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 ({e})") from None
    if chat:
        if not (isinstance(record, list)
                and all(isinstance(m, Mapping) and {"role", "content"} <= set(m) for m in record)):
            raise DataError(f"{where}: {field!r} must be a list of {{role, content}} messages")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in record]
    if not isinstance(record, str):
        raise DataError(f"{where}: {field!r} must be a string, got {type(record).__name__}")
    return record


class Documents(Sequence):
    """Raw records of one file or dataset, turned into documents on access."""

    def __init__(self, name: str, records: Sequence[Any], field: str, chat: bool):
        self.name, self.records, self.field, self.chat = name, records, field, chat

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Document:  # type: ignore[override]
        return to_document(self.records[i], self.field, self.chat, f"{self.name} record {i}")


class Chain(Sequence):
    """Several sequences read as one."""

    def __init__(self, parts: Sequence[Sequence]):
        self.parts = parts
        self.ends = np.cumsum([len(p) for p in parts]).tolist()

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, i: int):  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = bisect.bisect_right(self.ends, i)
        return self.parts[part][i - (self.ends[part - 1] if part else 0)]


class TextFiles(Sequence):
    """The contents of files, one string each."""

    def __init__(self, files: Sequence[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        try:
            return self.files[i].read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{self.files[i]}: not UTF-8 ({e})") from None


class JsonLines(Sequence):
    """The JSON objects of a .jsonl file, one per non-empty line, read through a memory map."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with path.open("rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        newlines = np.concatenate([np.zeros(0, np.int64)] + [  # in 64 MiB blocks, to bound memory
            start + np.flatnonzero(np.frombuffer(self.map, np.uint8, min(BLOCK, size - start), start) == 10)
            for start in range(0, size, BLOCK)])
        starts, ends = np.concatenate([[0], newlines + 1]), np.concatenate([newlines, [size]])
        self.lines = np.flatnonzero(ends > starts)  # 0-based line numbers of the non-empty lines
        self.starts, self.ends = starts[self.lines], ends[self.lines]

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        try:
            return json.loads(self.map[self.starts[i]:self.ends[i]])
        except ValueError as e:
            raise DataError(f"{self.path}:{self.lines[i] + 1}: bad JSON ({e})") from None


class ArrowColumn(Sequence):
    """One column of a parquet file, kept in Arrow memory; values become Python objects on access."""

    def __init__(self, path: Path, column: str):
        import pyarrow.parquet as pq

        try:
            self.column = pq.read_table(path, columns=[column]).column(column)
        except (KeyError, ValueError, OSError) as e:  # pyarrow: missing column, not a parquet file
            raise ConfigError(f"{path}: cannot read column {column!r}: {e}") from None

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        return self.column[i].as_py()


class ArrayRecords(Sequence):
    """The records of an ArrayRecord file: JSON objects are decoded, other bytes stay bytes."""

    def __init__(self, path: Path):
        import grain

        self.source = grain.sources.ArrayRecordDataSource([str(path)])

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        raw = self.source[i]
        if raw.lstrip()[:1] == b"{":
            try:
                return json.loads(raw)
            except ValueError:
                pass  # text that merely starts with a brace
        return raw


def load_documents(cfg: DataConfig) -> Sequence[Document]:
    """All documents of `cfg`'s source, in a fixed order; an empty source is a `ConfigError`."""
    field = "messages" if cfg.chat else cfg.text_field
    if cfg.source == "shakespeare":
        name = f"shakespeare[{cfg.split}]"
        docs: Sequence[Document] = shakespeare.load_text(cfg.split)
    elif cfg.source == "tfds":
        import tensorflow_datasets as tfds

        name = f"tfds {cfg.tfds_name}[{cfg.tfds_split}]"
        docs = Documents(name, tfds.data_source(cfg.tfds_name, split=cfg.tfds_split), field, cfg.chat)
    else:
        files = expand(cfg.paths)
        name = f"data.paths {[str(f) for f in files]}"
        if cfg.source == "text":
            docs = TextFiles(files)
        else:
            reader = {"jsonl": JsonLines, "parquet": lambda f: ArrowColumn(f, field),
                      "arrayrecord": ArrayRecords}[cfg.source]
            docs = Chain([Documents(str(f), reader(f), field, cfg.chat) for f in files])
    if len(docs) == 0:
        raise ConfigError(f"{name} holds no documents")
    return docs
