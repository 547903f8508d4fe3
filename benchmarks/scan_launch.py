"""Launch-setting sweep of the sequential Pallas scan kernels (Triton backend) at HyLo-1B shapes.

  gdn  the GDN chunk-state recurrence (`pallas_gdn.scans`: delta_c = u_c - w_c S_c,
       S_{c+1} = d_c S_c + k_c^T delta_c, and its reverse), 6 heads, d_k 256, d_v 512: value block vb,
       num_warps, num_stages; forward and backward kernel ms, and the forward's bytes as a fraction of the
       measured copy rate.
  ssd  the Mamba2 SSD scan (`pallas_ssd.ssd_pallas`), "g32n64" (32 heads, head_dim 64, d_state 64, 32
       groups): num_warps, num_stages; forward and forward+backward ms.
num_stages > 1 lets Triton software-pipeline the chunk loop (the next chunks' loads overlap this chunk's
matmuls); the loops are latency-bound, not bandwidth-bound. A setting the compiler refuses is a row.
    python benchmarks/scan_launch.py [--only gdn,ssd] [--shapes 4x4096,1x16384] [--iters 20]
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

from hylo_jax.kernels import pallas_gdn, pallas_ssd  # noqa: E402

H, DK, DV, C = 6, 256, 512, 64  # HyLo-Llama-1B GDN
SSD_H, SSD_P, SSD_N, SSD_G = 32, 64, 64, 32  # SSD g32n64
WARPS, STAGES = (4, 8), (1, 2, 3)


def copy_rate() -> float:
    """Measured device copy bytes/s (read + write) of a 1 GiB array."""
    x = jnp.ones((1 << 28,), jnp.float32)
    f = jax.jit(lambda x: x * 1.0000001)
    return 2 * x.nbytes / time_jax(f, x)


def _attempt(rows: list, head: list, run) -> None:
    try:
        rows.append(head + run())
    except Exception as e:  # noqa: BLE001 - a launch setting the compiler refuses is a row, not a crash
        rows.append(head + ["error", type(e).__name__, str(e)[:60]])


def gdn_rows(b: int, t: int, iters: int, rate: float) -> list:
    n = t // C
    rng = np.random.default_rng(0)
    r = lambda *s: jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.05)  # noqa: E731
    u, w, k = r(b, H, n, C, DV), r(b, H, n, C, DK).astype(jnp.bfloat16), r(b, H, n, C, DK).astype(jnp.bfloat16)
    decay = jnp.asarray(rng.uniform(0.5, 1.0, (b, H, n)).astype(np.float32))
    s0 = r(b, H, DK, DV)
    # bytes per launch: w, k (bf16) and u (fp32) in; states (bf16) and deltas (fp32) out.
    fwd_bytes = b * H * n * (C * DK * 2 * 2 + C * DV * 4 * 2 + DK * DV * 2)
    rows = []
    for vb, warps, stages in itertools.product(sorted({pallas_gdn.default_vb("gpu", DV, b * H), 32, 64}),
                                               WARPS, STAGES):
        def run(vb=vb, warps=warps, stages=stages):
            fwd, bwd = pallas_gdn.scans("gpu", None, jnp.bfloat16, vb=vb, num_warps=warps, num_stages=stages)
            f, g = jax.jit(fwd), jax.jit(bwd)
            states, deltas, final = f(u, w, k, decay, s0)
            t_f = time_jax(f, u, w, k, decay, s0, iters=iters)
            t_b = time_jax(g, w, k, decay, states, deltas, final, iters=iters)
            return [t_f * 1e3, t_b * 1e3, fwd_bytes / t_f / rate]

        _attempt(rows, ["gdn recurrence", f"{b}x{t}", vb, warps, stages], run)
    return rows


def ssd_rows(b: int, t: int, iters: int) -> list:
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    x = jnp.asarray(r(b, t, SSD_H, SSD_P), jnp.bfloat16)
    dt = jnp.asarray(rng.uniform(1e-3, 0.1, (b, t, SSD_H)), jnp.float32)
    a = -jnp.asarray(rng.uniform(1.0, 16.0, SSD_H), jnp.float32)
    bm, cm = (jnp.asarray(r(b, t, SSD_G, SSD_N), jnp.bfloat16) for _ in range(2))
    reset = jnp.zeros((b, t), bool)
    h0 = jnp.zeros((b, SSD_H, SSD_P, SSD_N), jnp.float32)
    rows = []
    for warps, stages in itertools.product(WARPS, STAGES):
        def run(warps=warps, stages=stages):
            def fwd(x, dt, a, bm, cm):
                return pallas_ssd.ssd_pallas(x, dt, a, bm, cm, reset, h0, C, backend="gpu", num_warps=warps,
                                             num_stages=stages)

            def loss(*args):
                y, s = fwd(*args)
                return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)

            f, g = jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
            args = (x, dt, a, bm, cm)
            return [time_jax(f, *args, iters=iters) * 1e3, time_jax(g, *args, iters=iters) * 1e3, "-"]

        _attempt(rows, ["ssd g32n64", f"{b}x{t}", SSD_P, warps, stages], run)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="gdn,ssd")
    parser.add_argument("--shapes", default="4x4096,1x16384")
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    rate = copy_rate()
    print(f"device: {jax.devices()[0].device_kind}; copy {rate / 1e12:.2f} TB/s")
    rows = []
    for shape in args.shapes.split(","):
        b, t = (int(v) for v in shape.split("x"))
        if "gdn" in args.only:
            rows += gdn_rows(b, t, args.iters, rate)
        if "ssd" in args.only:
            rows += ssd_rows(b, t, args.iters)
    print_table(["kernel", "B x T", "vb", "warps", "stages", "fwd ms", "bwd (gdn) / fwd+bwd (ssd) ms",
                 "fwd bytes / copy rate"], rows)


if __name__ == "__main__":
    main()
