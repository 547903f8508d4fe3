"""Where a compiled step spends its device time: profiles a few calls with `jax.profiler` (perfetto trace)
and prints one table of device kernels aggregated by name (total ms per call, share, calls), plus totals
per kind (matmul libraries, Pallas/Triton kernels, XLA fusions, copies/collectives).

Targets: `gdn` (Gated DeltaNet fwd+bwd at HyLo-1B shapes, B x T from --shape, impl from --impl) and
`distill` (the Stage II step of benchmarks/distill_step.py at --seq tokens).
    python benchmarks/profile_ops.py gdn --shape 1x16384 --impl pallas
    python benchmarks/profile_ops.py distill --seq 8192
    python benchmarks/profile_ops.py gdn --tiny        # CPU smoke run (host ops instead of GPU kernels)
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import distill_step  # noqa: E402  (sets the GPU memory fraction before jax starts)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import mixers  # noqa: E402
import numpy as np  # noqa: E402
from common import print_table  # noqa: E402

KINDS = (("matmul library", ("gemm", "cutlass", "xmma", "cublas", "sm90_", "nvjet")),
         ("attention (cuDNN)", ("cudnn", "fmha", "flash")),
         ("collective", ("nccl", "all-gather", "all-reduce", "collective")),
         ("copy / transpose", ("copy", "transpose", "memcpy", "memset", "dynamic-update-slice")),
         ("xla fusion", ("fusion", "loop_", "input_", "reduce")))


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "pallas / triton / other"


def device_events(trace_dir: Path) -> list[dict]:
    """Complete ('X') events on device (GPU) tracks of the perfetto trace under trace_dir (host events on CPU)."""
    files = sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    if not files:
        raise SystemExit(f"no perfetto trace under {trace_dir}")
    with gzip.open(files[-1], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"].get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in names.items() if "gpu" in name.lower() or "device" in name.lower()}
    keep = gpu or set(names)  # no device tracks (CPU run): every track
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in keep and "dur" in e]


def profile(fn, args, calls: int) -> list[dict]:
    jax.block_until_ready(fn(*args))  # compile and warm up outside the trace
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                out = fn(*args)
            jax.block_until_ready(out)
        return device_events(Path(d))


def report(events: list[dict], calls: int, top: int) -> None:
    per_name: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        per_name[e["name"]][0] += e["dur"] / 1e3 / calls
        per_name[e["name"]][1] += 1 / calls
    total = sum(v[0] for v in per_name.values())
    kinds: dict[str, float] = collections.defaultdict(float)
    for name, (ms, _) in per_name.items():
        kinds[kind_of(name)] += ms
    print(f"device kernel time per call: {total:.2f} ms (sum over kernels; overlapping streams add up)")
    print_table(["kind", "ms per call", "share"],
                [[k, ms, ms / total] for k, ms in sorted(kinds.items(), key=lambda kv: -kv[1])])
    rows = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    print_table(["kernel", "kind", "ms per call", "share", "launches per call"],
                [[name[:90], kind_of(name), ms, ms / total, n] for name, (ms, n) in rows])


def gdn_target(args):
    from hylo_jax.kernels.gated_delta import gated_delta_rule

    b, t = (int(v) for v in args.shape.split("x"))
    d = (mixers.TINY if args.tiny else mixers.FULL)["gdn"]
    rng = np.random.default_rng(0)
    data, dtypes, _, _ = mixers.gdn_case(rng, b, t, **d)
    q, k, v, g, beta = (jnp.asarray(data[n], dtypes[n]) for n in ("q", "k", "v", "g", "beta"))

    def forward(q, k, v, g, beta):
        return gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, impl=args.impl)

    def loss(q, k, v, g, beta):
        o, s = forward(q, k, v, g, beta)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    fn = forward if args.fwd else jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    return jax.jit(fn), (q, k, v, g, beta)


def distill_target(args):
    import dataclasses

    from flax import nnx

    from hylo_jax.train.config import StageConfig
    from hylo_jax.train.step import Distiller

    t_spec, s_spec = distill_step.specs(args.tiny, args.remat)
    teacher, student = t_spec.build(nnx.Rngs(0)), s_spec.build(nnx.Rngs(0))
    stage = dataclasses.replace(StageConfig(), loss="kd", kl_chunk=2048, steps=10)  # the configs' chunked KL
    distiller = Distiller(student, teacher, stage)
    batch = distill_step.make_batch(1, args.seq, t_spec.model.vocab_size, True)
    held = [distiller.init_state()]

    def step():
        held[0], metrics = distiller.run_step(held[0], batch)
        return metrics

    return step, ()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=["gdn", "distill"])
    parser.add_argument("--shape", default="1x16384", help="gdn: B x T")
    parser.add_argument("--impl", default="auto", help="gdn: impl")
    parser.add_argument("--fwd", action="store_true", help="gdn: forward only (default fwd+bwd)")
    parser.add_argument("--seq", type=int, default=8192, help="distill: tokens")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--tiny", action="store_true")
    distill_step.add_remat_argument(parser)
    args = parser.parse_args()
    if args.tiny:
        args.shape, args.seq = "1x128", 256
    fn, fn_args = (gdn_target if args.target == "gdn" else distill_target)(args)
    print(f"device: {jax.devices()[0].device_kind}; target {args.target} "
          + (f"{args.shape} impl {args.impl}" if args.target == "gdn" else f"{args.seq} tokens, remat {args.remat}"))
    report(profile(fn, fn_args, args.calls), args.calls, args.top)


if __name__ == "__main__":
    main()
