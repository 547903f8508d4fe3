"""Each Mosaic GPU kernel set on its own, each case in a subprocess under its own time limit, so that a kernel that
hangs or compiles for minutes costs only its own row: compile seconds, run ms, the relative error (max |a - b| /
max |b|) against the chunked path on the same bf16 inputs of the worst result (named: its index among the
op's outputs / input cotangents), and the same for the chunked path against itself on fp32 copies of the inputs.
The chunked paths compute in fp32 whatever the input dtype (here at "highest" matmul precision: a GPU's default
takes TF32, ~1e-3 off), so the first error is ours against (nearly) exact arithmetic on the same inputs, and the
second only the rounding of the bf16 outputs: not a bf16-operand path's error. A max-norm error of a whole
gradient is a loose bound; `accuracy.py` sets ours beside the peers' on one measure. Modes per op:
  fwd    the output where nothing differentiates (GDN: factors + forward; SSD: the y kernel);
  train  the output of jax.vjp's forward, with its residuals (GDN: the forward that saves S_c and delta_c;
         SSD: the train kernel);
  grad   every input cotangent (GDN: the reverse and gradient passes; SSD: the backward kernels);
  reverse, gradients (GDN only): that pass alone on random inputs of the op's shapes (a hang is then its own;
         the error column says whether its outputs are finite).

    python benchmarks/mosaic_probe.py [--shapes 1x1024,4x1024] [--cases gdn_fwd,ssd_g1n128_grad] [--limit 60]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import mixers  # noqa: E402  (sets the allocator environment before a JAX backend starts)
import numpy as np  # noqa: E402
from common import print_table  # noqa: E402
from kernels import with_kernels  # noqa: E402

from hylo_jax.kernels.gated_delta import gated_delta_rule  # noqa: E402
from hylo_jax.kernels.ssd import ssd  # noqa: E402

MODES = ("fwd", "train", "grad")
PASSES = ("reverse", "gradients")  # the GDN passes of the backward, each alone
OPS = ("gdn", *(f"ssd_{variant}" for variant in mixers.FULL["ssd"]))


def op_case(op: str, b: int, t: int):
    """(f(*args, impl) -> (output, final state), args) at the benchmark's full sizes, bf16 inputs."""
    rng = np.random.default_rng(0)
    if op == "gdn":
        data, dtypes, _, _ = mixers.gdn_case(rng, b, t, **mixers.FULL["gdn"])
        names = ("q", "k", "v", "g", "beta")

        def f(*a, impl):
            return gated_delta_rule(*a, use_qk_l2norm=True, chunk_size=mixers.CHUNK, impl=impl)
    else:
        data, dtypes, _, _ = mixers.ssd_case(rng, b, t, **mixers.FULL["ssd"][op.removeprefix("ssd_")])
        names = ("x", "dt", "A", "B", "C", "dt_bias")

        def f(*a, impl):
            return ssd(*a[:5], dt_bias=a[5], chunk_size=mixers.CHUNK, impl=impl)
    return f, [jnp.asarray(data[n], dtypes[n]) for n in names]


def program(f, mode: str, impl: str):
    """The jitted function of `mode` over f's inputs."""
    if mode == "fwd":
        return jax.jit(lambda *a: f(*a, impl=impl))

    def loss(*a):
        o, final = f(*a, impl=impl)
        return jnp.sum(jnp.sin(o.astype(jnp.float32))) + jnp.sum(final)

    if mode == "train":
        return jax.jit(lambda *a: jax.vjp(loss, *a))  # the primal, and the residuals (leaves of the VJP function)
    return jax.jit(jax.grad(loss, argnums=range(5)))


def gdn_pass(name: str, b: int, t: int):
    """(the jitted Mosaic GDN pass `name`, bf16 inputs in its layout: `mosaic_gdn.Kernels`) at the benchmark's
    GDN sizes, chunk 64."""
    from hylo_jax.kernels import mosaic_gdn

    h, dk, dv, c = mixers.FULL["gdn"]["h"], mixers.FULL["gdn"]["dk"], mixers.FULL["gdn"]["dv"], mixers.CHUNK
    n, rng = t // c, np.random.default_rng(0)

    def r(*shape, scale=1.0, dtype=jnp.bfloat16):
        return jnp.asarray(rng.standard_normal(shape, np.float32) * scale, dtype)

    passes = mosaic_gdn.kernels(jnp.bfloat16)
    if name == "reverse":
        ag = jnp.asarray(np.tril(rng.standard_normal((b, h, n, c, c), np.float32)) * 0.1 + np.eye(c) * 0.5,
                         jnp.bfloat16)
        g = jnp.asarray(np.cumsum(-rng.uniform(0, 0.05, (b, h, n, c)), -1), jnp.float32)
        args = (ag, r(b, t, h, dk, scale=0.06), r(b, t, h, dk, scale=0.06), g, jnp.zeros((b, t), jnp.float32),
                r(b, t, h, dv), r(b, h, dk, dv, dtype=jnp.float32))
        return jax.jit(passes.reverse), args
    args = (r(b, h, n, dk, dv), r(b, h, n, dk, dv), r(b, t, h, dv), r(b, h, n, c, dv), r(b, h, n, c, dv))
    return jax.jit(passes.gradients), args


def run_pass(name: str, b: int, t: int) -> dict:
    fn, args = gdn_pass(name, b, t)
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    print(f"compiled in {compile_s:.1f} s", flush=True)
    out = jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(compiled(*args))
    ms = (time.perf_counter() - start) / 3 * 1e3
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    return dict(compile_s=round(compile_s, 1), ms=round(ms, 3), error="finite" if finite else "NON-FINITE")


def run_case(op: str, mode: str, b: int, t: int) -> dict:
    if mode in PASSES:
        return run_pass(mode, b, t)
    f, args = op_case(op, b, t)
    ours = with_kernels(f, "mosaic")
    start = time.perf_counter()
    compiled = program(ours, mode, "pallas").lower(*args).compile()
    compile_s = time.perf_counter() - start
    print(f"compiled in {compile_s:.1f} s", flush=True)  # what a timeout reports: compiled, or not
    got = jax.block_until_ready(compiled(*args))
    start = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(compiled(*args))
    ms = (time.perf_counter() - start) / 3 * 1e3
    with jax.default_matmul_precision("highest"):
        want = program(f, mode, "chunked")(*args)
        exact = program(f, mode, "chunked")(*(x.astype(jnp.float32) for x in args))
    if mode == "train":
        got, want, exact = got[0], want[0], exact[0]
    errors = [relative_error(a, w) for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)]
    worst = int(np.argmax(errors))
    floor = relative_error(jax.tree.leaves(want)[worst], jax.tree.leaves(exact)[worst])
    return dict(compile_s=round(compile_s, 1), ms=round(ms, 3), error=f"{errors[worst]:.2e} (#{worst})",
                floor=f"{floor:.2e}")


def relative_error(a, b) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1x1024,4x1024", help="B x T list (GDN: 1 x 6 heads takes value "
                        "blocks of 32, 4 x 6 of 64)")
    parser.add_argument("--cases", default="", help="comma list of <op>_<mode> (default all)")
    parser.add_argument("--limit", type=float, default=60.0, help="seconds per case")
    parser.add_argument("--run", default="", help=argparse.SUPPRESS)  # op,mode,b,t: one case, JSON on stdout
    args = parser.parse_args()
    if args.run:
        op, mode, b, t = args.run.split(",")
        print(json.dumps(run_case(op, mode, int(b), int(t))))
        return
    print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}", flush=True)
    chosen = set(filter(None, args.cases.split(",")))
    rows = []
    for shape in args.shapes.split(","):
        b, t = map(int, shape.split("x"))
        for op in OPS:
            for mode in MODES + (PASSES if op == "gdn" else ()):
                if chosen and f"{op}_{mode}" not in chosen:
                    continue
                cmd = [sys.executable, __file__, "--run", f"{op},{mode},{b},{t}"]
                try:
                    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.limit)
                    if done.returncode:
                        status, result = f"error: {done.stderr.strip().splitlines()[-1][-200:]}", {}
                    else:
                        status, result = "ok", json.loads(done.stdout.strip().splitlines()[-1])
                except subprocess.TimeoutExpired as timeout:
                    out = timeout.stdout or b""
                    out = out.decode() if isinstance(out, bytes) else out
                    stage = "running" if "compiled in" in out else "compiling"
                    status, result = f"timeout ({args.limit:.0f} s) {stage}", {}
                row = [op, mode, shape, status, result.get("compile_s", ""), result.get("ms", ""),
                       result.get("error", ""), result.get("floor", "")]
                print("  " + " | ".join(map(str, row)), flush=True)
                rows.append(row)
    print_table(["op", "mode", "B x T", "status", "compile s", "ms", "rel err vs chunked (worst)",
                 "chunked on bf16 vs fp32 inputs (output rounding)"], rows)


if __name__ == "__main__":
    main()
