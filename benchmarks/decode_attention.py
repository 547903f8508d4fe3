"""One decode token of MLA attention over a latent cache: the Pallas flash-decode kernel vs XLA's blocked
online softmax (`cached_attention`, the XLA decode path), at HyLo-Llama-1B shapes by default (32 heads,
r = 128, d_rope = 32: configs/hylo-llama-1b-8mla8.yaml; `--rank 512 --rope 64` for DeepSeek's), bf16
cache, B = 1.

Prints one table: per context, ms per layer for each path, the kernel's max relative error against the
XLA path, and the achieved bandwidth (latent bytes read once / time) as a fraction of the HBM peak
(`--hbm-tbps`, default 3.35 for an H100 SXM). Both paths compute o_h = sum_j softmax_j(q_h . x_j) c_j.
    python benchmarks/decode_attention.py [--contexts 8192,65536,262144,1048576,2097152]
    python benchmarks/decode_attention.py --tiny     # CPU smoke run (kernel in interpret mode)
    python benchmarks/decode_attention.py --sweep --contexts 8192,2097152   # time launch shapes instead
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import print_table, time_jax  # noqa: E402

from hylo_jax.kernels import flash_decode  # noqa: E402
from hylo_jax.kernels.attention import cache_slots, latent_cached_attention  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default=None, help="comma-separated cache lengths")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--hbm-tbps", type=float, default=3.35, help="HBM peak, TB/s (H100 SXM: 3.35)")
    parser.add_argument("--sweep", action="store_true", help="time the kernel's launch shapes (DecodeTiling)")
    parser.add_argument("--rank", type=int, default=128, help="kv_lora_rank r")
    parser.add_argument("--rope", type=int, default=32, help="qk_rope_head_dim")
    args = parser.parse_args()
    heads, rank, rope = (16, 32, 16) if args.tiny else (32, args.rank, args.rope)
    contexts = [int(c) for c in (args.contexts or ("512,2048" if args.tiny else
                                                   "8192,65536,262144,1048576,2097152")).split(",")]
    interpret = jax.default_backend() != "gpu"
    scale = (128 + 64) ** -0.5
    rows = []
    for context in contexts:
        slots = cache_slots(context + 64)
        keys = jax.random.split(jax.random.key(context), 2)
        q = jax.random.normal(keys[0], (1, heads, rank + rope), jnp.bfloat16)
        latent = jax.random.normal(keys[1], (1, slots, rank + rope), jnp.bfloat16)
        limit = jnp.asarray([context], jnp.int32)
        read = context * (rank + rope) * 2  # bytes of latent the token must read
        if args.sweep:
            rows += sweep(q, latent, limit, rank=rank, scale=scale, interpret=interpret, tiny=args.tiny,
                          read=read, hbm_tbps=args.hbm_tbps)
            continue
        kernel = jax.jit(lambda q, x, n: flash_decode.latent_decode_attention(
            q, x, n, rank=rank, scale=scale, interpret=interpret))
        xla = jax.jit(lambda q, x, n: latent_cached_attention(  # the default decode path
            q[:, None], x, rank=rank, q_positions=(n - 1)[:, None], kv_length=n, scale=scale)[:, 0].astype(jnp.float32))
        want, got = np.asarray(xla(q, latent, limit)), np.asarray(kernel(q, latent, limit))
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        iters = 2 if args.tiny else 20
        t_xla = time_jax(xla, q, latent, limit, warmup=1, iters=iters)
        t_kernel = time_jax(kernel, q, latent, limit, warmup=1, iters=iters)
        rows.append([context, t_xla * 1e3, t_kernel * 1e3, t_xla / t_kernel, f"{err:.1e}",
                     read / t_kernel / 1e12 / args.hbm_tbps, read / t_xla / 1e12 / args.hbm_tbps])
        print("row:", rows[-1], file=sys.stderr, flush=True)
    print(f"device: {jax.devices()[0].device_kind}; heads {heads}, r {rank}, d_rope {rope}, bf16 cache, B = 1")
    if args.sweep:
        print_table(["context", "block", "programs", "warps", "stages", "kernel ms", "of HBM peak"], rows)
        return
    print_table(["context", "XLA ms", "kernel ms", "speed-up", "max rel err", "kernel of HBM peak",
                 "XLA of HBM peak"], rows)


def sweep(q, latent, limit, *, rank, scale, interpret, tiny, read, hbm_tbps) -> list[list]:
    """One row per launch shape: its time and fraction of the HBM peak (fastest first)."""
    grid = itertools.product((32, 64, 128), (264, 528, 1056), (4, 8), (2, 3, 4))
    rows = []
    for block, programs, warps, stages in ([(64, 512, 8, 2), (32, 264, 4, 2)] if tiny else grid):
        tiling = flash_decode.DecodeTiling(block=block, programs=programs, warps=warps, stages=stages)
        f = jax.jit(lambda q, x, n, t=tiling: flash_decode.latent_decode_attention(
            q, x, n, rank=rank, scale=scale, interpret=interpret, tiling=t))
        try:
            t = time_jax(f, q, latent, limit, warmup=1, iters=2 if tiny else 20)
        except jax.errors.JaxRuntimeError as e:  # e.g. the pipeline stages do not fit in shared memory
            print(f"tiling {tiling} fails: {str(e).splitlines()[0]}", file=sys.stderr)
            continue
        rows.append([int(limit[0]), block, programs, warps, stages, t * 1e3, read / t / 1e12 / hbm_tbps])
    return sorted(rows, key=lambda r: r[5])


if __name__ == "__main__":
    main()
