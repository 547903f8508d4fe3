"""Accuracy of our kernels and the peers' against one reference, on the benchmark's bf16 inputs.

For each op / shape of `kernels.py` and each implementation it times (ours on Mosaic GPU and Triton, our
chunked path, jax-linear-attention, fla, mamba_ssm), the output and every input cotangent of <o, dout> (the
benchmark's bf16 dout) are compared with the reference: our chunked path in fp32 at "highest" matmul precision
on the same bf16-valued inputs (exact fp32 products on a GPU too, where the default precision may be TF32; its
own error, ~1e-6, is three orders below what is measured here). One table of relative errors
||a - ref|| / ||ref|| (Frobenius), one column per tensor: the bar the kernels must meet is the peers' row.

    python benchmarks/accuracy.py [--only gdn,ssd] [--shapes 4x4096] [--skip "ours pallas,jla chunked"]
    python benchmarks/accuracy.py --tiny        # CPU smoke run (our kernels in interpret mode)
"""

from __future__ import annotations

import argparse
import sys
from itertools import zip_longest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import kernels  # noqa: E402
import mixers  # noqa: E402  (sets the allocator environment before a JAX backend starts)
import numpy as np  # noqa: E402
from common import print_table  # noqa: E402

NAMES = {"gdn": ("q", "k", "v", "g", "beta"), "ssd": ("x", "dt", "A", "B", "C", "dt_bias")}


def jax_output_and_grads(fn, data, dtypes, dout, precision=None):
    """(o, input cotangents of <o, dout>) as fp32 numpy arrays."""
    args = [jnp.asarray(data[k], dtypes[k]) for k in data]
    with jax.default_matmul_precision(precision):
        o, vjp = jax.vjp(jax.jit(fn), *args)
        grads = vjp(jnp.asarray(dout, o.dtype))
    return [np.asarray(x, np.float32) for x in (o, *grads)]


def torch_output_and_grads(fn, data, dtypes, dout):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = [torch.from_numpy(data[k]).to(device, getattr(torch, dtypes[k])).requires_grad_() for k in data]
    o = fn(*args)
    out = o.detach().float().cpu().numpy()
    try:
        o.backward(torch.from_numpy(dout).to(device, o.dtype))
    except Exception as err:  # a peer that refuses its backward (fla on Hopper with Triton < 3.7.1) keeps its output
        return [out, *[mixers.failure(err)] * len(args)]
    return [out, *(a.grad.float().cpu().numpy() for a in args)]


def relative_error(a, ref) -> float:
    return float(np.linalg.norm((a - ref).ravel()) / max(np.linalg.norm(ref.ravel()), 1e-30))


def measure(op, case, reference, impls, rows):
    data, dtypes, out_shape, _ = case
    dout = np.random.default_rng(1).standard_normal(out_shape, dtype=np.float32)
    want = jax_output_and_grads(reference, data, dtypes, dout, precision="highest")
    for name, framework, fn in impls:
        try:
            got = (jax_output_and_grads(fn, data, dtypes, dout) if framework == "jax"
                   else torch_output_and_grads(fn, data, dtypes, dout))
            cells = [a if isinstance(a, str) else f"{relative_error(a, w):.2e}" for a, w in zip(got, want, strict=True)]
        except Exception as err:  # report the row and go on
            cells = [mixers.failure(err)] + [""] * (len(want) - 1)
        row = [op, f"{out_shape[0]}x{out_shape[1]}", name, *cells]
        print("  " + " | ".join(row), file=sys.stderr, flush=True)
        rows.append(row)
        mixers.free_device_memory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--only", default="gdn,ssd", help="comma list of gdn, ssd")
    parser.add_argument("--shapes", default="4x4096", help="B x T list, e.g. 4x4096,1x16384")
    parser.add_argument("--variants", default="g32n64,g1n128", help="SSD variants (mixers.FULL)")
    parser.add_argument("--skip", default="", help="comma list of substrings of impl names to leave out")
    args = parser.parse_args()
    ops, skip = set(args.only.split(",")), args.skip.split(",")
    dims = mixers.TINY if args.tiny else mixers.FULL
    shapes = mixers.TINY_SHAPES[:1] if args.tiny else [tuple(int(v) for v in s.split("x"))
                                                        for s in args.shapes.split(",")]
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}")
    peers = mixers.load_peers()
    rng = np.random.default_rng(0)
    rows: list[list] = []
    for b, t in shapes if "gdn" in ops else []:
        d = dims["gdn"]
        measure("gdn", mixers.gdn_case(rng, b, t, **d), mixers.gdn_impls({}, d["dk"])[0][2],
                kernels.gdn_impls(peers, d["dk"], skip), rows)
    for variant, d in [(v, dims["ssd"][v]) for v in args.variants.split(",")] if "ssd" in ops else []:
        for b, t in shapes:
            measure(f"ssd {variant}", mixers.ssd_case(rng, b, t, **d), mixers.ssd_impls({})[0][2],
                    kernels.ssd_impls(peers, skip), rows)
    columns = [" / ".join(f"d{n}" for n in names if n) for names in zip_longest(*NAMES.values(), fillvalue="")]
    print_table(["op", "B x T", "impl", "out", *columns], [r + [""] * (4 + len(columns) - len(r)) for r in rows])


if __name__ == "__main__":
    main()
