"""The chunk-local part of the chunked gated delta rule: Pallas kernels (`pallas_gdn_local`) vs XLA
(`gated_delta._chunk_local`), forward and forward+backward, at HyLo-1B shapes, bf16 inputs.

One table: ms per call for each launch setting of the kernels (num_warps, precision of T's fp32 products)
and, as a probe of where the time goes, with T's inverse skipped (wrong values, timing only), next to the
XLA map, and the bytes the forward must move as a fraction of the measured copy rate.
    python benchmarks/gdn_local.py [--shape 1x16384] [--iters 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from common import print_table, time_jax  # noqa: E402
from gdn_recurrence import copy_rate  # noqa: E402

from hylo_jax.kernels import gated_delta, pallas_common, pallas_gdn_local  # noqa: E402

H, DK, DV, C = 6, 256, 512, 64


def inputs(b: int, t: int):
    n = t // C
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    bf = jnp.bfloat16
    q = jnp.asarray(unit(rng.standard_normal((b, H, n, C, DK))) * DK**-0.5, bf)
    k = jnp.asarray(unit(rng.standard_normal((b, H, n, C, DK))), bf)
    v = jnp.asarray(rng.standard_normal((b, H, n, C, DV)), bf)
    beta = jnp.asarray(rng.uniform(0, 1, (b, H, n, C)), jnp.float32)
    cum = jnp.cumsum(jnp.asarray(np.log(rng.uniform(0.9, 1, (b, H, n, C))), jnp.float32), -1)
    seg = jnp.zeros((b, 1, n, C), jnp.float32)
    return q, k, v, beta, cum, seg


def timed(local, args, iters):
    fwd = jax.jit(local)

    def loss(*a):
        return sum(jnp.sum(x.astype(jnp.float32)) for x in local(*a))

    both = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    return time_jax(fwd, *args, iters=iters) * 1e3, time_jax(both, *args, iters=iters) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1x16384")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    b, t = (int(v) for v in args.shape.split("x"))
    xs = inputs(b, t)
    rate = copy_rate()
    n = t // C
    fwd_bytes = b * H * n * C * (2 * DK * 2 + DV * 2 + DV * 4 + 3 * DK * 2 + C * 2 + C * 4)
    print(f"device: {jax.devices()[0].device_kind}; {args.shape}; copy {rate / 1e12:.2f} TB/s; "
          f"forward bytes at the copy rate {fwd_bytes / rate * 1e3:.3f} ms")
    rows = [["XLA _chunk_local", "-", "-", *timed(lambda *a: gated_delta._chunk_local(*a, jnp.bfloat16), xs,
                                                  args.iters)]]
    precs = {"tf32x3": pallas_common.TF32_X3, "tf32": lax.DotAlgorithmPreset.TF32_TF32_F32,
             "ieee": lax.Precision.HIGHEST}
    for warps in (4, 8):
        for name, prec in precs.items():
            local = pallas_gdn_local.chunk_local("gpu", None, jnp.bfloat16, prec, warps)
            rows.append(["pallas", warps, name, *timed(local, xs, args.iters)])
    exact_inverse = pallas_gdn_local._unit_lower_inverse
    pallas_gdn_local._unit_lower_inverse = lambda lower, prec: lower  # probe: no inverse
    pallas_gdn_local.chunk_local.cache_clear()
    for warps in (4, 8):
        local = pallas_gdn_local.chunk_local("gpu", None, jnp.bfloat16, pallas_common.TF32_X3, warps)
        rows.append(["pallas, inverse skipped (probe)", warps, "-", *timed(local, xs, args.iters)])
    pallas_gdn_local._unit_lower_inverse = exact_inverse
    print_table(["map", "warps", "T precision", "fwd ms", "fwd+bwd ms"], rows)


if __name__ == "__main__":
    main()
