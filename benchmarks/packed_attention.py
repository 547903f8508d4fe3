"""Training attention over packed rows: cuDNN with a dense [T, T] segment mask vs cuDNN's packed layout.

Causal self-attention, bf16, B = 1, rows of T tokens packed with `--docs` documents of random lengths plus
trailing padding (segment ids), at the HyLo-Llama-1B shapes (MLA expanded: 32 heads, d 64; the Llama
teacher's GQA: 32 query / 8 kv heads, d 64). Rows: the dense mask (`max_segments=0`), the packed layout
(`max_segments=docs + 1` and the training default 33), one document in the packed layout (bound 33) and
one document without segment ids (what the trainer sends when every row is one document). Prints forward
and forward+backward ms; first, the packed path's error (output and gradients) against XLA in fp32 for
rows of 1, 4 and 20 documents at bound 33.
    python benchmarks/packed_attention.py [--tokens 8192,32768] [--docs 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import print_table, time_jax  # noqa: E402

from hylo_jax.config import MAX_DOCS_PER_ROW, segment_bound  # noqa: E402
from hylo_jax.kernels.attention import attention  # noqa: E402

BOUND = segment_bound(MAX_DOCS_PER_ROW)  # model.max_segments of training runs
SHAPES = {"MLA (expanded)": (32, 32, 64), "GQA teacher": (32, 8, 64)}  # heads, kv heads, d


def packed_ids(b: int, t: int, docs: int, seed: int = 0) -> jax.Array:
    """Rows of `docs` documents of random lengths (ids 1..docs) followed by padding (0)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t - t // 16), docs - 1, replace=False))
        lengths = np.diff(np.concatenate([[0], cuts, [t - t // 16]]))
        rows.append(np.concatenate([np.repeat(np.arange(1, docs + 1), lengths), np.zeros(t // 16, int)]))
    return jnp.asarray(np.stack(rows), jnp.int32)


def _inputs(b, t, heads, kv_heads, d, dtype=jnp.bfloat16):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(kq, (b, t, heads, d), dtype), jax.random.normal(kk, (b, t, kv_heads, d), dtype),
            jax.random.normal(kv, (b, t, kv_heads, d), dtype))


def check(docs: int) -> dict[str, float]:
    """Max |packed cuDNN (bf16, bound 33) - XLA (fp32)| / max |XLA| of the output and of dq, dk, dv."""
    ids = packed_ids(2, 2048, docs)
    q, k, v = _inputs(2, 2048, *SHAPES["GQA teacher"])
    ct = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)

    def run(impl, max_segments, *qkv):
        f = lambda q, k, v: jnp.sum(attention(q, k, v, segment_ids=ids, impl=impl,  # noqa: E731
                                              max_segments=max_segments).astype(jnp.float32) * ct)
        out = attention(*qkv, segment_ids=ids, impl=impl, max_segments=max_segments)
        return (out, *jax.grad(f, argnums=(0, 1, 2))(*qkv))

    got = jax.jit(lambda *a: run("cudnn", BOUND, *a))(q, k, v)
    want = jax.jit(lambda *a: run("xla", 0, *a))(*(x.astype(jnp.float32) for x in (q, k, v)))
    rel = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))  # noqa: E731
    return {name: rel(a, b) for name, a, b in zip(("o", "dq", "dk", "dv"), got, want)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="8192,32768")
    parser.add_argument("--docs", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    for docs in (1, 4, 20):
        print(f"check {docs} documents (packed cuDNN bf16 vs XLA fp32, max |err| / max |ref|): "
              + ", ".join(f"{n} {e:.1e}" for n, e in check(docs).items()), flush=True)
    rows = []
    for t in (int(x) for x in args.tokens.split(",")):
        ids = packed_ids(1, t, args.docs)
        for shape, dims in SHAPES.items():
            q, k, v = _inputs(1, t, *dims)
            ct = jnp.ones(q.shape, jnp.float32)
            one = jnp.ones_like(ids)
            for name, seg, max_segments in (("dense [T, T] mask", ids, 0), ("packed layout", ids, args.docs + 1),
                                            (f"packed layout, bound {BOUND}", ids, BOUND),
                                            (f"one document, bound {BOUND}", one, BOUND),
                                            ("one document, no segment ids", None, 0)):
                f = lambda q, k, v, seg=seg, m=max_segments: attention(  # noqa: E731
                    q, k, v, segment_ids=seg, max_segments=m, impl="cudnn")
                both = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32) * ct),
                                        argnums=(0, 1, 2)))
                fwd = time_jax(jax.jit(f), q, k, v, warmup=2, iters=args.iters)
                rows.append([f"1x{t}", shape, name, fwd * 1e3, time_jax(both, q, k, v, warmup=2,
                                                                        iters=args.iters) * 1e3])
                print("row:", rows[-1], file=sys.stderr, flush=True)
    print(f"device: {jax.devices()[0].device_kind}; {args.docs} documents per row + padding")
    print_table(["B x T", "shape", "segments", "fwd ms", "fwd+bwd ms"], rows)


if __name__ == "__main__":
    main()
