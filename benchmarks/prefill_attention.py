"""One prefill chunk attending a long MLA cache: the engine's path vs the kernels it is made of vs cuDNN.

HyLo-Llama-1B's MLA layer (32 heads, latent r = 128 + rope 32, keys 32 + 32 and values 64 per head),
bf16, B = 1: a chunk of `--chunk` queries at the end of a cache of S slots. Rows:
- "ours (cached_attention)": the engine's prefill attention - blocks of the latent decompressed per
  step, whole blocks on cuDNN (with its lse), the causal tail on the flash block kernel, merged by lse;
- "flash block kernel only": the same blocks, every one on the Pallas flash block kernel (before);
- "xla online softmax": `cached_attention(impl="xla")`;
- "cudnn, keys expanded (ceiling)": one cuDNN call on keys/values decompressed beforehand (no mask, no
  decompression, no merges: what the path can at best approach).
FLOPs: 2 (d + dv) per (query, key, head). Then the error of ours (bf16) against the XLA path in fp32.
    python benchmarks/prefill_attention.py [--contexts 65536,262144,1048576,2097152] [--chunk 8192]
    python benchmarks/prefill_attention.py --tiny   # CPU smoke run (kernels in interpret mode)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import matmul_ceiling_tflops, print_table, time_jax  # noqa: E402

from hylo_jax.kernels import attention as attention_module  # noqa: E402
from hylo_jax.kernels.attention import cached_attention  # noqa: E402
from hylo_jax.kernels.flash_block import flash_block  # noqa: E402

HEADS, RANK, NOPE, ROPE, DV = 32, 128, 32, 32, 64  # HyLo-Llama-1B MLA


def _inputs(s: int, chunk: int, dtype):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    latent = jax.random.normal(k1, (1, s, 1, RANK + ROPE), dtype)
    w_uk = jax.random.normal(k2, (RANK, HEADS, NOPE), dtype) * RANK ** -0.5
    w_uv = jax.random.normal(k3, (RANK, HEADS, DV), dtype) * RANK ** -0.5
    q = jax.random.normal(k4, (1, chunk, HEADS, 1, NOPE + ROPE), dtype)
    return q, latent, w_uk, w_uv


def _expand(w_uk, w_uv):
    """Latent block [b, n, 1, r + rope] -> keys [b, n, heads, nope + rope], values [b, n, heads, dv]."""
    def expand(keys, values):
        c, rope = keys[:, :, 0, :RANK], keys[:, :, :, RANK:]
        nope = jnp.einsum("bnr,rhd->bnhd", c, w_uk)
        k = jnp.concatenate([nope, jnp.broadcast_to(rope, nope.shape[:3] + (ROPE,))], -1)
        return k, jnp.einsum("bnr,rhd->bnhd", values[:, :, 0, :RANK], w_uv)
    return expand


def _impls(s: int, chunk: int, interpret: bool):
    positions = jnp.arange(s - chunk, s)[None]
    length = jnp.array([s])
    scale = (NOPE + ROPE) ** -0.5

    def cached(impl):
        def f(q, latent, w_uk, w_uv):
            out = cached_attention(q, latent, latent, q_positions=positions, kv_length=length, scale=scale,
                                   expand=_expand(w_uk, w_uv), impl=impl)  # q groups = the expanded heads
            return out[:, :, :, 0]
        return f

    def flash_only(q, latent, w_uk, w_uv):
        original = attention_module._unmasked_attend
        attention_module._unmasked_attend = lambda q, k, v, valid, *, scale, interpret: flash_block(
            q, k, v, *(jnp.zeros((1, n), jnp.int32) for n in (q.shape[1], k.shape[1], q.shape[1])),
            (jnp.arange(k.shape[1]) >= valid[:, None]).astype(jnp.int32), scale=scale, interpret=interpret)
        try:
            return cached("pallas")(q, latent, w_uk, w_uv)
        finally:
            attention_module._unmasked_attend = original

    def expanded(latent, w_uk, w_uv):
        return _expand(w_uk, w_uv)(latent, latent)

    def cudnn(q, k, v):
        v = jnp.pad(v, [(0, 0)] * 3 + [(0, NOPE + ROPE - DV)])
        return jax.nn.dot_product_attention(q[:, :, :, 0], k, v, scale=scale, implementation="cudnn")[..., :DV]

    impls = {"ours (cached_attention)": (cached("pallas"), False),
             "flash block kernel only": (flash_only, False)}
    if s <= 262144:
        impls["xla online softmax"] = (cached("xla"), False)
    if not interpret:
        impls["cudnn, keys expanded (ceiling)"] = (cudnn, True)
    return impls, jax.jit(expanded)


def check(s: int, chunk: int) -> float:
    """Max |ours (bf16) - XLA (fp32)| / max |XLA| on one chunk against an s-slot cache."""
    impls, _ = _impls(s, chunk, jax.default_backend() != "gpu")
    ours = impls["ours (cached_attention)"][0]
    ref = _impls(s, chunk, True)[0]["xla online softmax"][0]
    inputs = _inputs(s, chunk, jnp.bfloat16)
    got = jax.jit(ours)(*inputs).astype(jnp.float32)
    want = jax.jit(ref)(*(x.astype(jnp.float32) for x in inputs))
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default=None, help="comma-separated cache lengths")
    parser.add_argument("--chunk", type=int, default=None, help="queries per prefill chunk (default 8192)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    interpret = args.tiny or jax.default_backend() != "gpu"
    if args.tiny:
        attention_module.CACHE_BLOCK, attention_module.EXPANDED_BYTES = 64, 64 * HEADS * 128 * 2
    chunk = args.chunk or (64 if args.tiny else 8192)
    contexts = [int(c) for c in (args.contexts or ("256" if args.tiny else "65536,262144,1048576,2097152")).split(",")]
    err = check(min(contexts[0], 4 * chunk), chunk)
    print(f"check (ours bf16 vs XLA fp32, max |err| / max |ref|, S = {min(contexts[0], 4 * chunk)}): {err:.1e}",
          flush=True)
    ceiling = None if interpret else matmul_ceiling_tflops()
    rows = []
    for s in contexts:
        q, latent, w_uk, w_uv = _inputs(s, chunk, jnp.bfloat16)
        impls, expanded = _impls(s, chunk, interpret)
        flops = 2 * (NOPE + ROPE + DV) * chunk * s * HEADS
        for name, (f, takes_expanded) in impls.items():
            args_ = (q, *expanded(latent, w_uk, w_uv)) if takes_expanded else (q, latent, w_uk, w_uv)
            seconds = time_jax(jax.jit(f), *args_, warmup=1, iters=args.iters)
            tflops = flops / seconds / 1e12
            rows.append([s, name, seconds * 1e3, tflops, "" if ceiling is None else f"{tflops / ceiling:.2f}"])
            print("row:", rows[-1], file=sys.stderr, flush=True)
            del args_
    print(f"matmul ceiling: {ceiling and round(ceiling)} TFLOP/s; chunk {chunk} queries at the end of the cache")
    print_table(["cache slots", "impl", "ms", "TFLOP/s", "of ceiling"], rows)


if __name__ == "__main__":
    main()
