"""Data pipeline: sources, tokenisation, packing, determinism, resume, host sharding, errors."""

import dataclasses
import itertools
import json

import grain
import jax
import numpy as np
import pytest
from conftest import byte_tokenizer

from hylo_jax.config import from_dict
from hylo_jax.data.packing import next_token_pairs, pack
from hylo_jax.data.pipeline import DataConfig, heldout_tokens, make_dataset
from hylo_jax.data.sources import DataError, load_documents
from hylo_jax.errors import ConfigError


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def texts(n: int) -> list[str]:
    return [f"d{i:02d}" + " w" * (i % 7) for i in range(n)]


def write_jsonl(path, records) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    return str(path)


def segments(batches, tok) -> list[str]:
    """The text of every packed piece (its tokens plus its last target), special tokens dropped."""
    out = []
    for b in batches:
        for row in range(len(b["tokens"])):
            seg = b["segment_ids"][row]
            for s in range(1, seg.max() + 1):
                ids = [*b["tokens"][row][seg == s], b["targets"][row][seg == s][-1]]
                out.append(tok.decode(ids, skip_special_tokens=True))
    return out


def take(it, n):
    return list(itertools.islice(it, n))


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_packing_hand_example():
    # Documents of 4, 6 and 10 tokens = 3, 5 and 9 next-token pairs, packed into rows of 8.
    docs = [next_token_pairs(100 * (d + 1) + np.arange(n), np.ones(n, bool)) for d, n in enumerate([4, 6, 10])]
    rows = list(pack(grain.MapDataset.source(docs).to_iter_dataset(), seq_len=8, bins=3, patience=3))
    seg = np.stack([r["segment_ids"] for r in rows])
    pos = np.stack([r["positions"] for r in rows])
    tokens, targets = np.stack([r["tokens"] for r in rows]), np.stack([r["targets"] for r in rows])
    mask = np.stack([r["loss_mask"] for r in rows])
    np.testing.assert_array_equal(seg, [[1, 1, 1, 2, 2, 2, 2, 2], [1] * 8, [1] + [0] * 7])
    np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 2, 3, 4], list(range(8)), [0] * 8])
    np.testing.assert_array_equal(tokens, [[100, 101, 102, 200, 201, 202, 203, 204],
                                           [300 + i for i in range(8)], [308] + [0] * 7])
    np.testing.assert_array_equal(targets[seg > 0], tokens[seg > 0] + 1)  # the next token, same document
    np.testing.assert_array_equal(mask, seg > 0)  # padding masked
    assert np.all(tokens[seg > 0] // 100 == targets[seg > 0] // 100)  # no target crosses a boundary
    assert all(r[k].dtype == np.int32 for r in rows for k in r)


def test_packing_bounds_documents_per_row():
    """`max_docs`: no row holds more pieces than that (the bound packed GPU attention relies on)."""
    docs = [next_token_pairs(np.arange(3), np.ones(3, bool)) for _ in range(9)]  # 2 pairs each
    for max_docs, most in ((0, 4), (3, 3)):
        rows = list(pack(grain.MapDataset.source(docs).to_iter_dataset(), seq_len=8, bins=2, patience=3,
                         max_docs=max_docs))
        assert max(int(r["segment_ids"].max()) for r in rows) == most
        assert sum(int((r["segment_ids"] > 0).sum()) for r in rows) == 18  # every pair packed once


def test_jsonl_text_parquet_arrayrecord_sources(tok, tmp_path):
    docs = texts(6)
    cfgs = {"jsonl": write_jsonl(tmp_path / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(docs)])}
    for i, t in enumerate(docs):
        (tmp_path / f"t{i}.txt").write_text(t)
    cfgs["text"] = str(tmp_path / "t*.txt")
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs[:3]}), tmp_path / "a.parquet")
        pq.write_table(pa.table({"text": docs[3:]}), tmp_path / "b.parquet")
        cfgs["parquet"] = str(tmp_path / "*.parquet")
    except ImportError:
        pass
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(tmp_path / "a.arrayrecord"), "group_size:1")
    for i, t in enumerate(docs):  # JSON objects and plain text may mix
        writer.write(json.dumps({"text": t}).encode() if i % 2 else t.encode())
    writer.close()
    cfgs["arrayrecord"] = str(tmp_path / "a.arrayrecord")
    for source, path in cfgs.items():
        cfg = DataConfig(source=source, paths=(path,), seq_len=16, global_batch_size=1, shuffle=False,
                         num_epochs=1, packing_bins=2)
        assert sorted(segments(make_dataset(cfg, tok), tok)) == sorted(docs), source


def test_chat_trains_on_assistant_tokens_only(tok, tmp_path):
    chats = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{i}"},
              {"role": "assistant", "content": f"a{i}!"}, {"role": "user", "content": "more"},
              {"role": "assistant", "content": f"b{i}"}] for i in range(4)]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in chats])
    cfg = DataConfig(source="jsonl", paths=(path,), chat=True, seq_len=128, global_batch_size=1,
                     shuffle=False, num_epochs=1, packing_bins=1)
    found = set()
    for b in make_dataset(cfg, tok):
        seg, mask = b["segment_ids"][0], b["loss_mask"][0]
        for s in range(1, seg.max() + 1):
            prompt = tok.decode(b["tokens"][0][seg == s])
            i = prompt[len("<|system|>be brief<|end|><|user|>q"):][0]
            assert tok.decode(b["targets"][0][(seg == s) & (mask == 1)]) == f"a{i}!<|end|>b{i}<|end|>"
            found.add(i)
    assert found == {"0", "1", "2", "3"}


def test_same_seed_same_batches_other_seed_other_order(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts(40)])
    cfg = DataConfig(source="jsonl", paths=(path,), seq_len=32, global_batch_size=4, seed=3)
    first = take(make_dataset(cfg, tok), 3)
    assert_same(first, take(make_dataset(cfg, tok), 3))
    other = take(make_dataset(dataclasses.replace(cfg, seed=4), tok), 3)
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(first, other))


def test_resume_yields_the_uninterrupted_batches(tok, tmp_path):
    # Long and short documents, several epochs: states fall mid-document and mid-pack.
    docs = [t * (1 + 9 * (i % 3 == 0)) for i, t in enumerate(texts(9))]
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs])
    cfg = DataConfig(source="jsonl", paths=(path,), seq_len=16, global_batch_size=2, packing_bins=3)
    reference = take(make_dataset(cfg, tok), 30)
    for k in (0, 1, 4, 7, 13, 22):
        it = make_dataset(cfg, tok)
        take(it, k)
        state = json.loads(json.dumps(it.get_state()))
        assert_same(take(make_dataset(cfg, tok, state=state), 30 - k), reference[k:])


def test_hosts_partition_the_global_batch(tok, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts(30)])
    cfg = DataConfig(source="jsonl", paths=(path,), seq_len=24, global_batch_size=4, packing_bins=2)
    whole = take(make_dataset(cfg, tok), 3)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    parts = []
    for host in range(2):
        monkeypatch.setattr(jax, "process_index", lambda host=host: host)
        it = make_dataset(cfg, tok)
        parts.append(take(it, 2))
        state = json.loads(json.dumps(it.get_state()))  # the same on every host
        parts[-1] += take(make_dataset(cfg, tok, state=state), 1)
    assert all(b["tokens"].shape == (2, 24) for p in parts for b in p)
    assert_same(whole, [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)])
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    with pytest.raises(ConfigError, match="not divisible"):
        make_dataset(cfg, tok)


def test_shakespeare_hamlet_is_held_out(tok):
    train = load_documents(DataConfig(split="train"))
    (hamlet,) = load_documents(DataConfig(split="heldout"))
    assert len(train) == 37 and hamlet.startswith("# Hamlet")
    assert not any(play.startswith("# Hamlet") for play in train)
    rows = heldout_tokens(tok, seq_len=64, max_rows=3)
    assert rows["tokens"].shape == (3, 64) and rows["loss_mask"].all()
    text = tok.decode(np.concatenate([r for r in rows["tokens"]]))
    assert hamlet.startswith(text)


def test_config_from_dict():
    cfg = from_dict(DataConfig, {"source": "jsonl", "paths": ["a.jsonl", "b/*.jsonl"], "num_epochs": None})
    assert cfg.paths == ("a.jsonl", "b/*.jsonl")


def test_errors(tok, tmp_path):
    with pytest.raises(ConfigError, match="missing.jsonl does not exist"):
        make_dataset(DataConfig(source="jsonl", paths=(str(tmp_path / "missing.jsonl"),)), tok)
    with pytest.raises(ConfigError, match="no file matches"):
        make_dataset(DataConfig(source="text", paths=(str(tmp_path / "*.txt"),)), tok)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="empty.jsonl.*holds no documents"):
        make_dataset(DataConfig(source="jsonl", paths=(str(tmp_path / "empty.jsonl"),)), tok)
    with pytest.raises(ConfigError, match="seq_len must be at least 2"):
        DataConfig(seq_len=1)
    with pytest.raises(ConfigError, match="paths is empty"):
        DataConfig(source="parquet")
    with pytest.raises(ConfigError, match="chat"):
        DataConfig(source="text", paths=("a.txt",), chat=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match="bad.jsonl:3: bad JSON"):
        list(make_dataset(DataConfig(source="jsonl", paths=(str(bad),), shuffle=False, num_epochs=1), tok))
    with pytest.raises(DataError, match="no field 'body'"):
        next(make_dataset(DataConfig(source="jsonl", paths=(str(bad),), text_field="body"), tok))
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}] * 3)
    with pytest.raises(DataError, match="fewer than 2 tokens"):  # would otherwise spin forever
        next(make_dataset(DataConfig(source="jsonl", paths=(blank,), add_eos=False), tok))
