"""Context-parallel attention blocks: the Pallas flash block kernel (`kernels/flash_block.py`) vs the XLA
online softmax over query tiles it replaces (`parallel/context.py: _tiled_softmax`) vs cuDNN's fused
attention (the one-device path, the ceiling: it cannot take global positions, so it only serves as peer).

One block = a shard's local queries against one shard's keys at the HyLo-Llama-1B shapes, bf16, B = 1:
MLA (32 heads, qk 192 = 128 + 64, v 128, keys per head) and the Llama teacher's GQA (32 query / 8 kv
heads, d 64); "diag" is a shard's own block (causal), "past" a block of earlier keys (no mask).
Prints one table: ms and TFLOP/s forward and forward+backward per impl (FLOPs counted as
2 (d + dv) per visible (query, key, head) forward, 2.5x that backward), and the fraction of the measured
bf16 matmul ceiling; then the kernel's error against fp32 dense attention on a small case.
    python benchmarks/block_attention.py [--tokens 32768]
    python benchmarks/block_attention.py --sweep   # kernel tiles (q rows, k rows, warps, stages): one table
    python benchmarks/block_attention.py --tiny    # CPU smoke run (kernel in interpret mode)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import matmul_ceiling_tflops, print_table, time_jax  # noqa: E402

from hylo_jax.kernels.flash_block import NEG, Tile, Tiling, flash_block  # noqa: E402
from hylo_jax.parallel.context import _tiled_softmax  # noqa: E402

SHAPES = {"MLA": (32, 32, 192, 128), "GQA": (32, 8, 64, 64)}  # heads, kv heads, d, dv


def _inputs(key, t, heads, kv_heads, d, dv, dtype=jnp.bfloat16):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (1, t, heads, d), dtype), jax.random.normal(kk, (1, t, kv_heads, d), dtype),
            jax.random.normal(kv, (1, t, kv_heads, dv), dtype))


def _impls(t: int, block: str, interpret: bool):
    """name -> f(q, k, v) -> o [b, t, h, dv] for this block kind."""
    qpos = jnp.arange(t) + (t if block == "past" else 0)
    kpos, seg = jnp.arange(t), jnp.ones((1, t), jnp.int32)

    def ours(q, k, v):
        return flash_block(q, k, v, qpos, kpos, seg, seg, scale=q.shape[-1] ** -0.5, interpret=interpret)[0]

    def tiles(q, k, v):
        merge = _tiled_softmax(q, seg, qpos, q.shape[-1] ** -0.5, k.shape[2], v.shape[-1])
        return merge.finish(merge.update(merge.init, k, v, seg, kpos))

    def cudnn(q, k, v):
        d, dv = q.shape[-1], v.shape[-1]
        v = jnp.pad(v, [(0, 0)] * 3 + [(0, d - dv)])
        return jax.nn.dot_product_attention(q, k, v, is_causal=block == "diag", implementation="cudnn")[..., :dv]

    impls = {"pallas flash block": ours, "xla tiles (before)": tiles}
    if jax.default_backend() == "gpu":
        impls["cudnn (peer, no positions)"] = cudnn
    return impls


def _timed(f, q, k, v, iters):
    ct = jnp.ones(q.shape[:3] + (v.shape[-1],), jnp.float32)
    fwd = jax.jit(f)
    both = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) * ct), argnums=(0, 1, 2)))
    return (time_jax(fwd, q, k, v, warmup=1, iters=iters), time_jax(both, q, k, v, warmup=1, iters=iters))


def check(interpret: bool):
    """Max relative error of the kernel (bf16 inputs) vs fp32 dense attention of the same inputs."""
    t, heads, kv_heads, d, dv = 256, 4, 2, 192, 128
    q, k, v = _inputs(jax.random.key(1), t, heads, kv_heads, d, dv)
    qpos, kpos = jnp.arange(t) + 64, jnp.arange(t)
    seg = jnp.asarray(np.repeat([1, 2], [100, 156])[None], jnp.int32)
    scale = d ** -0.5

    def dense(q, k, v):
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        k, v = jnp.repeat(k, heads // kv_heads, 2), jnp.repeat(v, heads // kv_heads, 2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") * scale
        ok = (kpos[None, :] <= qpos[:, None])[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])
        lse = jax.nn.logsumexp(jnp.where(ok, s, NEG), -1)
        p = jnp.where(ok, jnp.exp(s - lse[..., None]), 0.0)
        return jnp.einsum("bhqk,bkhv->bqhv", p, v, precision="highest"), lse

    ours = lambda q, k, v: flash_block(q, k, v, qpos, kpos, seg, seg, scale=scale, interpret=interpret)  # noqa: E731
    (o, lse), vjp = jax.vjp(jax.jit(ours), q, k, v)
    (o_ref, lse_ref), vjp_ref = jax.vjp(dense, q, k, v)
    ct = (jax.random.normal(jax.random.key(2), o.shape), jax.random.normal(jax.random.key(3), lse.shape))
    rel = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))  # noqa: E731
    errs = {"o": rel(o, o_ref), "lse": rel(lse, lse_ref)}
    errs.update({f"d{n}": rel(a, b) for n, a, b in zip("qkv", vjp(ct), vjp_ref(ct))})
    print("check (bf16 kernel vs fp32 dense, max |err| / max |ref|): "
          + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()), flush=True)
    return errs


SWEEP = [Tile(64, 64, 4, 2), Tile(64, 64, 4, 3), Tile(128, 64, 4, 2), Tile(128, 64, 8, 2), Tile(128, 64, 8, 3),
         Tile(128, 32, 4, 2), Tile(64, 32, 4, 2), Tile(32, 64, 4, 2), Tile(64, 128, 8, 2)]


def sweep(t: int, interpret: bool, iters: int) -> None:
    """Every SWEEP tile for all three kernels on the causal (diag) block: fwd ms and bwd ms (fwd+bwd - fwd)."""
    qpos, seg = jnp.arange(t), jnp.ones((1, t), jnp.int32)
    rows = []
    for name, (heads, kv_heads, d, dv) in SHAPES.items():
        q, k, v = _inputs(jax.random.key(0), t, heads, kv_heads, d, dv)
        for tile in SWEEP:
            f = lambda q, k, v, tile=tile: flash_block(q, k, v, qpos, qpos, seg, seg, scale=0.1,  # noqa: E731
                                                       interpret=interpret, tiling=Tiling(tile, tile, tile))[0]
            try:
                fwd, both = _timed(f, q, k, v, iters)
                rows.append([name, f"q{tile.q} k{tile.k} w{tile.warps} s{tile.stages}", fwd * 1e3,
                             (both - fwd) * 1e3])
            except Exception as e:  # noqa: BLE001  (a tile Triton cannot compile is reported)
                rows.append([name, f"q{tile.q} k{tile.k} w{tile.warps} s{tile.stages}", type(e).__name__, ""])
            print("row:", rows[-1], file=sys.stderr, flush=True)
    print_table(["shape", "tile", "fwd ms", "bwd ms"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="queries (= keys) per block (default 32768)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time kernel tiles instead of the impls")
    args = parser.parse_args()
    interpret = jax.default_backend() != "gpu"
    t = args.tokens or (64 if args.tiny else 32768)
    iters = 2 if args.tiny else 5
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}; block of {t} queries x {t} keys, B = 1")
    if args.sweep:
        return sweep(t, interpret, iters)
    errs = check(interpret)
    ceiling = matmul_ceiling_tflops(512 if args.tiny else 8192)
    rows = []
    for name, (heads, kv_heads, d, dv) in SHAPES.items():
        if args.tiny:
            heads, kv_heads = 4, max(1, kv_heads // 8)
        q, k, v = _inputs(jax.random.key(0), t, heads, kv_heads, d, dv)
        for block in ("diag", "past"):
            visible = t * t * (0.5 if block == "diag" else 1.0)
            flops = 2 * heads * visible * (d + dv)
            for impl, f in _impls(t, block, interpret).items():
                try:
                    fwd, both = _timed(f, q, k, v, iters)
                except Exception as e:  # noqa: BLE001  (an impl that fails a shape is reported, not fatal)
                    rows.append([name, block, impl, f"failed: {type(e).__name__}", "", "", "", ""])
                    print("row:", rows[-1], str(e)[:300], file=sys.stderr, flush=True)
                    continue
                tf_fwd, tf_both = flops / fwd / 1e12, 3.5 * flops / both / 1e12
                rows.append([name, block, impl, fwd * 1e3, both * 1e3, tf_fwd, tf_both, tf_both / ceiling])
                print("row:", rows[-1], file=sys.stderr, flush=True)
    print(f"measured bf16 matmul ceiling {ceiling:.3g} TFLOP/s; check errors: "
          + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()))
    print_table(["shape", "block", "impl", "fwd ms", "fwd+bwd ms", "fwd TFLOP/s", "fwd+bwd TFLOP/s",
                 "fwd+bwd of ceiling"], rows)


if __name__ == "__main__":
    main()
