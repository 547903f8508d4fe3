"""Sweep of the GDN chunk-state recurrence kernels (`pallas_gdn.scans`, Triton backend) at HyLo-1B shapes.

The recurrence delta_c = u_c - w_c S_c, S_{c+1} = d_c S_c + k_c^T delta_c (and its reverse) is the only
sequential part of the Pallas GDN path. One table: forward and backward kernel time per launch setting
(value block vb, num_warps, num_stages: Triton software-pipelines the per-chunk loads of the loop when
num_stages > 1), and the bytes each launch moves as a fraction of the measured device copy rate.
    python benchmarks/gdn_recurrence.py [--shapes 4x4096,1x16384] [--iters 20]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from common import print_table, time_jax  # noqa: E402

from hylo_jax.kernels import pallas_gdn  # noqa: E402

H, DK, DV, C = 6, 256, 512, 64  # HyLo-Llama-1B GDN


def inputs(b: int, t: int):
    n = t // C
    rng = np.random.default_rng(0)
    r = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.05)  # noqa: E731
    u, w, k = r(b, H, n, C, DV), r(b, H, n, C, DK).astype(jnp.bfloat16), r(b, H, n, C, DK).astype(jnp.bfloat16)
    decay = jnp.asarray(rng.uniform(0.5, 1.0, (b, H, n)).astype(np.float32))
    s0 = r(b, H, DK, DV)
    return u, w, k, decay, s0


def copy_rate() -> float:
    """Measured device copy bytes/s (read + write) of a 1 GiB array."""
    x = jnp.ones((1 << 28,), jnp.float32)
    f = jax.jit(lambda x: x * 1.0000001)
    return 2 * x.nbytes / time_jax(f, x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4x4096,1x16384")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    rate = copy_rate()
    print(f"device: {jax.devices()[0].device_kind}; copy {rate / 1e12:.2f} TB/s")
    rows = []
    for shape in args.shapes.split(","):
        b, t = (int(v) for v in shape.split("x"))
        u, w, k, decay, s0 = inputs(b, t)
        n = t // C
        # bytes per launch: w, k (bf16) and u (fp32) in; states (bf16) and deltas (fp32) out.
        fwd_bytes = b * H * n * (C * DK * 2 * 2 + C * DV * 4 * 2 + DK * DV * 2)
        default = pallas_gdn.default_vb("gpu", DV, b * H)
        for vb, warps, stages in itertools.product(sorted({default, 32, 64}), (4, 8), (1, 2, 3)):
            fwd, bwd = pallas_gdn.scans("gpu", None, jnp.bfloat16, vb=vb, num_warps=warps, num_stages=stages)
            f = jax.jit(fwd)
            try:
                states, deltas, final = f(u, w, k, decay, s0)
                g = jax.jit(bwd)
                t_f = time_jax(f, u, w, k, decay, s0, iters=args.iters)
                t_b = time_jax(g, w, k, decay, states, deltas, final, iters=args.iters)
                rows.append([shape, vb, warps, stages, t_f * 1e3, t_b * 1e3, fwd_bytes / t_f / rate])
            except Exception as e:  # noqa: BLE001 - a launch setting the compiler refuses is a row, not a crash
                rows.append([shape, vb, warps, stages, "error", type(e).__name__, str(e)[:60]])
    print_table(["B x T", "vb", "warps", "stages", "fwd ms", "bwd ms", "fwd bytes / copy rate"], rows)


if __name__ == "__main__":
    main()
