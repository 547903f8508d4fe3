"""Pallas kernels vs our chunked path vs peers: GDN and Mamba2 SSD at HyLo-Llama-1B shapes, bf16 inputs.

One table like `mixers.py` (whose peer loading, inputs, timing and FLOP formulas it imports): forward and
forward+backward ms, tokens/s, TFLOP/s and its fraction of the bf16 matmul ceiling measured in the same run,
for ours `impl="pallas"`, ours `impl="auto"` (SSD: the Pallas forward, under differentiation the chunked path
unless batch x heads fills the GPU, `ssd.fills_gpu`),
ours `impl="pallas"` on the Mosaic GPU kernels (`mosaic_ssd`, `mosaic_gdn`, Hopper; "ours mosaic"), ours
`impl="chunked"`, jax-linear-attention (and fla / mamba_ssm if installed).

    python benchmarks/kernels.py [--only gdn,ssd] [--shapes 4x4096,1x16384,1x65536] [--skip "jla chunked"]
    python benchmarks/kernels.py --check [--check-shape 2x1000]   # pallas vs chunked, outputs and grads
    python benchmarks/kernels.py --tiny                            # CPU smoke run (interpret mode)

`--check` runs both paths on the same random inputs (odd length, packed segments, initial state) in fp32
(both exact: the kernels use IEEE fp32 products for fp32 operands) and in bf16 (the kernels multiply bf16
operands, accumulating in fp32; the chunked path computes in fp32), on a GPU also the Mosaic kernels vs
chunked in bf16, and prints the max relative error (max |a - b| / max |b|) of the output, the final state and
every input cotangent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import mixers  # noqa: E402  (sets the allocator environment before a JAX backend starts)
import numpy as np  # noqa: E402
from common import matmul_ceiling_tflops, print_table  # noqa: E402

from hylo_jax.kernels import pallas_common  # noqa: E402
from hylo_jax.kernels.gated_delta import gated_delta_rule  # noqa: E402
from hylo_jax.kernels.ssd import ssd  # noqa: E402


def with_kernels(fn, kernels: str):
    """`fn` traced with the GPU Pallas path on these kernels ("triton" or "mosaic": `pallas_common.gpu_kernels`)."""
    def run(*args, **kwargs):
        with pallas_common.gpu_kernels(kernels):
            return fn(*args, **kwargs)
    return run


# (name, impl, GPU kernels) of our rows: the Pallas path on Triton and on Mosaic GPU (Hopper), and "auto"
OURS = (("ours pallas", "pallas", "triton"), ("ours mosaic", "pallas", "mosaic"))


def gdn_impls(peers, dk, skip, docs: int = 0):
    """Our rows and the peers'; with `docs`, also ours on Mosaic with segment ids of that many equal documents a
    row (the packed-sequence kernels: the segment index loaded and masked; 1: ids given, no reset)."""
    def ours(impl, kernels, docs=0):
        def gdn(q, k, v, g, beta):
            b, t = q.shape[:2]
            ids = None if not docs else jnp.broadcast_to(jnp.arange(t) * docs // t, (b, t))
            return gated_delta_rule(q, k, v, g, beta, segment_ids=ids, chunk_size=mixers.CHUNK, impl=impl)[0]
        return with_kernels(gdn, kernels)

    rows = [(name, "jax", ours(impl, kernels)) for name, impl, kernels in OURS]
    if docs:
        rows.append((f"ours mosaic, {docs} docs a row", "jax", ours("pallas", "mosaic", docs)))
    return [i for i in rows + mixers.gdn_impls(peers, dk) if not any(s and s in i[0] for s in skip)]


def ssd_impls(peers, skip):
    def ours_ssd(impl):
        return lambda x, dt, A, B, C, dt_bias: ssd(x, dt, A, B, C, dt_bias=dt_bias, chunk_size=mixers.CHUNK,
                                                   impl=impl)[0]

    ours = [(name, "jax", with_kernels(ours_ssd(impl), kernels))
            for name, impl, kernels in (*OURS, ("ours auto", "auto", "triton"))]
    return [i for i in ours + mixers.ssd_impls(peers) if not any(s and s in i[0] for s in skip)]


# ---------------------------------------------------------------- --check
def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _segments(rng, b, t):
    return jnp.asarray(np.cumsum(rng.random((b, t)) < 3.0 / t, axis=1), jnp.int32)


def check(dims, b, t, ops, kernels) -> None:
    rng = np.random.default_rng(2)
    rows = []
    if "gdn" in ops:
        rows += _check_gdn(dims, b, t, rng, kernels)
    if "ssd" in ops:
        rows += _check_ssd(dims, b, t, rng, kernels)
    print_table(["op", "inputs", "output", "final state", "output (no grad)", *[f"d{n}" for n in
                 ("q/x", "k/dt", "v/A", "g/B", "beta/C", "s0/dt_bias", "D", "s0")]], rows)


def _check_gdn(dims, b, t, rng, kernels):
    rows = []
    d = dims["gdn"]
    data, _, _, _ = mixers.gdn_case(rng, b, t, **d)
    s0 = rng.standard_normal((b, d["h"], d["dk"], d["dv"]), dtype=np.float32)
    seg = _segments(rng, b, t)
    names = ["q", "k", "v", "g", "beta", "initial_state"]
    for dtype in ("bfloat16", "float32"):
        args = [jnp.asarray(data[k], dtype if k in ("q", "k", "v") else "float32") for k in names[:5]]
        args.append(jnp.asarray(s0))

        def f(*a, impl):
            return gated_delta_rule(*a[:5], initial_state=a[5], segment_ids=seg, use_qk_l2norm=True,
                                    chunk_size=mixers.CHUNK, impl=impl)
        rows += _compare_kernels("gdn", dtype, f, args, names, rng, kernels)
    return rows


def _check_ssd(dims, b, t, rng, kernels):
    rows = []
    seg = _segments(rng, b, t)
    for variant, d in dims["ssd"].items():
        data, _, _, _ = mixers.ssd_case(rng, b, t, **d)
        data["D"] = rng.standard_normal(d["h"], dtype=np.float32)
        s0 = rng.standard_normal((b, d["h"], d["p"], d["n"]), dtype=np.float32)
        names = ["x", "dt", "A", "B", "C", "dt_bias", "D", "initial_state"]
        for dtype in ("bfloat16", "float32"):
            args = [jnp.asarray(data[k], dtype if k in ("x", "B", "C") else "float32") for k in names[:7]]
            args.append(jnp.asarray(s0))

            def f(*a, impl):
                return ssd(*a[:5], dt_bias=a[5], D=a[6], initial_state=a[7], segment_ids=seg,
                           chunk_size=mixers.CHUNK, impl=impl)
            rows += _compare_kernels(f"ssd {variant}", dtype, f, args, names, rng, kernels)
    return rows


def _compare_kernels(op, dtype, f, args, names, rng, kernels):
    """pallas vs chunked on the Triton kernels and, on a GPU with bf16 inputs, on the Mosaic GPU kernels (those
    of `kernels`)."""
    rows = _compare(op, dtype, with_kernels(f, "triton"), args, names, rng) if "triton" in kernels else []
    if "mosaic" in kernels and dtype == "bfloat16" and jax.default_backend() == "gpu":
        try:
            rows += _compare(f"{op} mosaic", dtype, with_kernels(f, "mosaic"), args, names, rng)
        except Exception as err:  # report it and go on to the other ops
            print(f"  check {op} mosaic failed: {type(err).__name__}: {str(err)[-3000:]}", file=sys.stderr, flush=True)
            rows.append([f"{op} mosaic", dtype, "failed"] + [""] * 10)
    return rows


def _compare(op, dtype, f, args, names, rng):
    with jax.default_matmul_precision("highest"):
        outs, grads = {}, {}
        for impl in ("chunked", "pallas"):
            fn = jax.jit(lambda *a, impl=impl: f(*a, impl=impl))
            (o, s), vjp = jax.vjp(fn, *args)
            if impl == "chunked":
                do = jnp.asarray(rng.standard_normal(o.shape, dtype=np.float32), o.dtype)
                ds = jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32))
            outs[impl] = (o, s)
            grads[impl] = vjp((do, ds))
        plain = fn(*args)[0]  # the forward alone: kernels that keep nothing for a backward (mosaic GDN)
    errs = [_rel(outs["pallas"][0], outs["chunked"][0]), _rel(outs["pallas"][1], outs["chunked"][1]),
            _rel(plain, outs["chunked"][0])]
    errs += [_rel(a, b) for a, b in zip(grads["pallas"], grads["chunked"])]
    errs += [""] * (11 - len(errs))
    print(f"  check {op} {dtype}: " + " ".join(f"{n}={e:.2e}" for n, e in zip(["out", "state", "out0", *names], errs)
                                             if e != ""), file=sys.stderr, flush=True)
    return [[op, dtype, *[f"{e:.1e}" if e != "" else "" for e in errs]]]


# ---------------------------------------------------------------- driver
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--only", default="gdn,ssd", help="comma list of gdn, ssd")
    parser.add_argument("--shapes", default="", help="only these B x T, e.g. 4x4096,1x65536")
    parser.add_argument("--skip", default="", help="comma list of substrings of impl names to leave out")
    parser.add_argument("--iters", type=int, default=None, help="calls per timed sample (default 20; 2 tiny)")
    parser.add_argument("--gdn-value-block", type=int, default=0,
                        help="Mosaic GDN passes' value block (tuning; default `mosaic_gdn.value_block`'s choice)")
    parser.add_argument("--gdn-docs", type=int, default=0,
                        help="also time ours on Mosaic with segment ids of N documents a row (1: ids, no reset)")
    parser.add_argument("--check", action="store_true", help="compare pallas vs chunked and exit")
    parser.add_argument("--check-shape", default="1x500", help="B x T of --check")
    parser.add_argument("--check-kernels", default="triton,mosaic", help="kernel sets --check compares")
    args = parser.parse_args()
    dims = mixers.TINY if args.tiny else mixers.FULL
    if args.gdn_value_block:
        from hylo_jax.kernels import mosaic_gdn

        mosaic_gdn.value_block = lambda rows, dv, cores: args.gdn_value_block
    device = jax.devices()[0]
    print(f"device: {device.device_kind}; jax {jax.__version__}")
    if args.check:
        b, t = (int(v) for v in args.check_shape.split("x"))
        check(dims, *((1, 40) if args.tiny else (b, t)), set(args.only.split(",")), args.check_kernels.split(","))
        return
    ops = set(args.only.split(","))
    skip = [s for s in args.skip.split(",") if s]
    iters = args.iters or (2 if args.tiny else 20)
    shapes = [(1, 64)] if args.tiny else mixers.SHAPES
    if args.shapes:
        keep = {tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")}
        shapes = [s for s in shapes if s in keep]
    track_memory = device.memory_stats() is not None
    ceiling = matmul_ceiling_tflops(512 if args.tiny else 8192)
    print(f"measured bf16 matmul ceiling {ceiling:.3g} TFLOP/s")
    peers = mixers.load_peers()
    rng = np.random.default_rng(0)
    rows: list[list] = []
    for b, t in shapes if "gdn" in ops else []:
        d = dims["gdn"]
        mixers.run_case("gdn", mixers.gdn_case(rng, b, t, **d), gdn_impls(peers, d["dk"], skip, args.gdn_docs),
                        ceiling, iters, track_memory, rows)
    for variant, d in dims["ssd"].items() if "ssd" in ops else []:
        for b, t in shapes:
            mixers.run_case(f"ssd {variant}", mixers.ssd_case(rng, b, t, **d), ssd_impls(peers, skip), ceiling,
                            iters, track_memory, rows)
    print_table(["op", "B x T", "impl", "pass", "ms", "tokens/s", "TFLOP/s", "of ceiling", "peak GiB"], rows)


if __name__ == "__main__":
    main()
