"""The GDN chunk-factor kernel (`kernels/mosaic_gdn_factors.py`, saving T) vs XLA's `chunk_inverse`: T = (I + M)^-1
for every chunk, at HyLo-1B GDN shapes (6 heads, d_k 256, chunks of 64), bf16 keys, correlated. One table: error of
T against XLA in fp32 (highest precision) and ms, saving T (the training forward) and writing Ag alone (the
forward), of the kernel walking 1, 2, 4 and 8 chunks a CTA (the default, `default_chunks_per_cta`, marked) and of
XLA with bf16 products.
HYLO_MOSAIC_SEMANTICS=warpgroup tries the other lowering (`mosaic_common.compiler_params`).

    python benchmarks/gdn_factors.py [--shapes 1x16384,4x4096]      # Hopper GPU
    python benchmarks/gdn_factors.py --tiny                          # CPU: the GPU interpreter
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from common import print_table, time_jax

from hylo_jax.kernels import gated_delta, mosaic_common, mosaic_gdn_factors, pallas_common

F32, BF16 = jnp.float32, jnp.bfloat16


def inputs(b: int, t: int, h: int, dk: int, c: int = 64):
    rng = np.random.default_rng(0)
    n = t // c
    k = rng.standard_normal((b, n * c, h, dk))  # the op's layout, which the kernel reads
    k = 0.5 * k + rng.standard_normal((b, 1, h, dk))  # correlated keys: large entries of T
    k = jnp.asarray(k / np.linalg.norm(k, axis=-1, keepdims=True), BF16)
    beta = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((b, h, n, c)))), F32)
    cum = jnp.asarray(np.cumsum(-0.05 * np.logaddexp(0, rng.standard_normal((b, h, n, c))), -1), F32)
    seg = jnp.asarray(np.cumsum(rng.random((b, 1, n, c)) < 0.03, -1), jnp.int32)
    return k, beta, cum, seg


def rel(a, b) -> float:
    return float(jnp.max(jnp.abs(a.astype(F32) - b)) / jnp.max(jnp.abs(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run in the GPU interpreter")
    parser.add_argument("--shapes", default="1x16384,4x4096", help="B x T list")
    args = parser.parse_args()
    shapes = [(1, 128)] if args.tiny else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    interpret = mosaic_common.interpret_params() if args.tiny else None
    iters = 2 if args.tiny else 20
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}")
    rows = []
    for b, t in shapes:
        x = inputs(b, t, 2 if args.tiny else 6, 64 if args.tiny else 256)
        with jax.default_matmul_precision("highest"):
            t_ref = jax.jit(gated_delta.chunk_inverse)(gated_delta._in_chunks(x[0].astype(F32), 64), *x[1:])
        xla = jax.jit(lambda k, *a: gated_delta.chunk_inverse(gated_delta._in_chunks(k, 64), *a, dtype=BF16))
        candidates = [("xla bf16", "", xla, None)]
        default = mosaic_gdn_factors.default_chunks_per_cta(b * x[1].shape[1], t // 64,
                                                            pallas_common.grid_cores(interpret))
        for walk in (w for w in (1, 2, 4, 8) if (t // 64) % w == 0):
            def factor(*a, walk=walk, save_t=True):
                return mosaic_gdn_factors.chunk_factor(*a, save_t=save_t, chunks_per_cta=walk, interpret=interpret)
            label = f"{walk}{' (default)' * (walk == default)}"
            candidates.append(("kernel", label, jax.jit(lambda *a, f=factor: f(*a)[1]),
                               jax.jit(lambda *a, f=factor: f(*a, save_t=False))))
        for name, walk, fn, ag_only in candidates:
            try:
                cells = [f"{rel(fn(*x), t_ref):.1e}", f"{time_jax(fn, *x, warmup=1, iters=iters) * 1e3:.3f}",
                         "" if ag_only is None else f"{time_jax(ag_only, *x, warmup=1, iters=iters) * 1e3:.3f}"]
            except Exception as err:  # report it and go on
                cells = [f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}", "", ""]
            rows.append([f"{b}x{t}", name, walk, *cells])
            print(*rows[-1], flush=True)  # a row as soon as it is measured (compiles can be slow)
    print_table(["B x T", "impl", "chunks a CTA", "T err", "ms (saving T)", "ms (Ag alone)"], rows)

if __name__ == "__main__":
    main()
