"""Where a compiled step spends its device time: profiles a few calls with `jax.profiler` (perfetto trace)
and prints one table of device kernels aggregated by name (total ms per call, share, calls), plus totals
per kind (matmul libraries, Pallas/Triton kernels, XLA fusions, copies/collectives).

With `--sources`, XLA dumps the optimised HLO and a second table attributes each kernel to the Python
line that made it (the HLO instruction's `source_file:source_line`, marked bwd when the op name shows a
transpose): the part of the model a fusion or matmul belongs to.

Targets: `gdn` (Gated DeltaNet fwd+bwd at HyLo-1B shapes, B x T from --shape, impl from --impl), `ssd` (Mamba2's
SSD as benchmarks/kernels.py times it, --variant g32n64 or g1n128: ours on the Mosaic kernels, or jla's with --impl
jla) and `distill` (the Stage II step of benchmarks/distill_step.py at --seq tokens).
    python benchmarks/profile_ops.py gdn --shape 1x16384 --impl pallas
    python benchmarks/profile_ops.py ssd --shape 1x16384 --variant g1n128 --fwd
    python benchmarks/profile_ops.py distill --seq 8192
    python benchmarks/profile_ops.py gdn --tiny        # CPU smoke run (host ops instead of GPU kernels)
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

HLO_DUMP = Path(tempfile.mkdtemp(prefix="hlo_dump_")) if "--sources" in sys.argv else None
if HLO_DUMP:  # before jax starts: XLA reads its flags once. No CUDA graphs: the trace would name the graph, not the op
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={HLO_DUMP} --xla_dump_hlo_as_text"
                               " --xla_dump_hlo_pass_re=^$ --xla_gpu_enable_command_buffer=")

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


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}")
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\d+)')
_TABLE_ROW = re.compile(r'^(\d+) (?:"(.*)"|\{(.*)\})$')


def _frame_tables(lines: list[str]) -> tuple[dict, dict, dict]:
    """The module's FileNames, FileLocations and StackFrames tables (id -> value) from its header."""
    tables: dict[str, dict[int, object]] = collections.defaultdict(dict)
    section = None
    for line in lines:
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
        elif line.startswith(("%", "ENTRY", "HloModule")):
            section = None
        elif section and (m := _TABLE_ROW.match(line)):
            tables[section][int(m.group(1))] = (m.group(2) if m.group(2) is not None
                                                else {k: int(v) for k, v in _FIELD.findall(m.group(3))})
    return tables["FileNames"], tables["FileLocations"], tables["StackFrames"]


def _project_frame(frame_id: int, files: dict, locations: dict, frames: dict) -> str:
    """"file:line" of the innermost frame outside installed packages (the innermost frame if none is)."""
    first, seen = None, set()
    while frame_id in frames and frame_id not in seen:
        seen.add(frame_id)
        location = locations[frames[frame_id]["file_location_id"]]
        file = files[location["file_name_id"]]
        where = f"{Path(file).name}:{location['line']}"
        first = first or where
        if "site-packages" not in file and "dist-packages" not in file:
            return where
        frame_id = frames[frame_id].get("parent_frame_id", 0)
    return first or "?"


def hlo_sources(dump: Path) -> dict[tuple[str, str], str]:
    """(module, instruction) -> "file:line [bwd]" from the optimised HLO modules XLA dumped under `dump`."""
    sources = {}
    for path in dump.glob("*after_optimizations.txt"):
        lines = path.read_text().splitlines()
        module = lines[0].split()[1].rstrip(",") if lines and lines[0].startswith("HloModule") else path.name
        files, locations, frames = _frame_tables(lines)
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            meta = {k: v.strip('"') for k, v in _FIELD.findall(m.group(2))}
            if "stack_frame_id" in meta:
                where = _project_frame(int(meta["stack_frame_id"]), files, locations, frames)
            elif "source_file" in meta:
                where = f"{Path(meta['source_file']).name}:{meta.get('source_line', '?')}"
            else:
                continue
            if "transpose(" in meta.get("op_name", ""):
                where += " bwd"
            sources[module, m.group(1)] = where
    return sources


def source_of(event: dict, sources: dict[tuple[str, str], str]) -> str:
    """The source line of a trace event's HLO op (args hlo_module / hlo_op), else its op name (args tf_op)."""
    args = event.get("args", {})
    key = (args.get("hlo_module", ""), args.get("hlo_op", "").lstrip("%"))
    if key in sources:
        return sources[key]
    op = args.get("tf_op", "")
    if op:  # the op name's last two scopes, e.g. "transpose(jvp(...))/dot_general"
        return "op " + "/".join(op.split("/")[-2:])[-60:]
    return "(no source: " + kind_of(event["name"]) + ")"


def report_sources(events: list[dict], calls: int, top: int) -> None:
    sources = hlo_sources(HLO_DUMP)
    per_source: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    kernels: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        where = source_of(e, sources)
        per_source[where][0] += e["dur"] / 1e3 / calls
        per_source[where][1] += 1 / calls
        kernels[where][e["name"][:40]] += e["dur"] / 1e3 / calls
    total = sum(v[0] for v in per_source.values())
    rows = sorted(per_source.items(), key=lambda kv: -kv[1][0])[:top]
    print(f"by source line ({len(sources)} HLO instructions with a source)")
    print_table(["source", "ms per call", "share", "kernels per call", "largest kernels (ms)"],
                [[where, ms, ms / total, n, ", ".join(f"{k} {v:.2f}" for k, v in kernels[where].most_common(2))]
                 for where, (ms, n) in rows])


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
    """The GDN op as benchmarks/kernels.py times it (no l2norm, o's VJP); --impl jla profiles jla's mosaic_gpu."""
    from hylo_jax.kernels.gated_delta import gated_delta_rule

    b, t = (int(v) for v in args.shape.split("x"))
    d = (mixers.TINY if args.tiny else mixers.FULL)["gdn"]
    rng = np.random.default_rng(0)
    data, dtypes, out_shape, _ = mixers.gdn_case(rng, b, t, **d)
    q, k, v, g, beta = (jnp.asarray(data[n], dtypes[n]) for n in ("q", "k", "v", "g", "beta"))
    if args.impl == "jla":
        linear_attention = mixers.load_peers()["jax-linear-attention"]

        def forward(q, k, v, g, beta):
            return linear_attention("gated_deltanet", q, k, v, g=g, beta=beta, scale=d["dk"] ** -0.5,
                                    impl="mosaic_gpu")[0]
    else:
        def forward(q, k, v, g, beta):
            return gated_delta_rule(q, k, v, g, beta, chunk_size=mixers.CHUNK, impl=args.impl)[0]

    if args.fwd:
        return jax.jit(forward), (q, k, v, g, beta)
    dout = jnp.asarray(rng.standard_normal(out_shape, dtype=np.float32), jnp.bfloat16)

    def fwd_bwd(q, k, v, g, beta, dout):
        return jax.vjp(forward, q, k, v, g, beta)[1](dout)
    return jax.jit(fwd_bwd), (q, k, v, g, beta, dout)


def ssd_target(args):
    """Mamba2's SSD as benchmarks/kernels.py times it: ours on the Mosaic kernels (--tiny: "auto"), or with --impl jla
    jla's."""
    import kernels

    b, t = (int(v) for v in args.shape.split("x"))
    d = (mixers.TINY if args.tiny else mixers.FULL)["ssd"][args.variant]
    rng = np.random.default_rng(0)
    data, dtypes, out_shape, _ = mixers.ssd_case(rng, b, t, **d)
    inputs = [jnp.asarray(data[n], dtypes[n]) for n in ("x", "dt", "A", "B", "C", "dt_bias")]
    peers = {"jax-linear-attention": mixers.load_peers()["jax-linear-attention"]} if args.impl == "jla" else {}
    ours = "ours auto" if args.tiny else "ours mosaic"  # (the Mosaic kernels take no tiny shape)
    forward = dict((name, fn) for name, _, fn in kernels.ssd_impls(peers, ()))["jla mosaic_gpu" if args.impl == "jla"
                                                                              else ours]
    if args.fwd:
        return jax.jit(forward), inputs
    dout = jnp.asarray(rng.standard_normal(out_shape, dtype=np.float32), jnp.bfloat16)

    def fwd_bwd(*args):
        return jax.vjp(forward, *args[:-1])[1](args[-1])
    return jax.jit(fwd_bwd), (*inputs, dout)


def distill_target(args):
    import dataclasses

    from flax import nnx

    from hylo_jax.train.config import StageConfig
    from hylo_jax.train.step import Distiller

    t_spec, s_spec = distill_step.specs(args.tiny, args.remat, args.docs)
    teacher, student = t_spec.build(nnx.Rngs(0)), s_spec.build(nnx.Rngs(0))
    stage = dataclasses.replace(StageConfig(), loss="kd", kl_chunk=2048, steps=10)  # the configs' chunked KL
    distiller = Distiller(student, teacher, stage)
    batch = distill_step.make_batch(1, args.seq, t_spec.model.vocab_size, args.docs)
    held = [distiller.init_state()]

    def step():
        held[0], metrics = distiller.run_step(held[0], batch)
        return metrics

    return step, ()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=["gdn", "ssd", "distill"])
    parser.add_argument("--shape", default="1x16384", help="gdn, ssd: B x T")
    parser.add_argument("--impl", default="auto", help="gdn: impl, or jla (its mosaic_gpu kernels); ssd: jla or ours")
    parser.add_argument("--variant", default="g1n128", choices=["g32n64", "g1n128"], help="ssd: its shape")
    parser.add_argument("--fwd", action="store_true", help="gdn, ssd: forward only (default fwd+bwd)")
    parser.add_argument("--seq", type=int, default=8192, help="distill: tokens")
    parser.add_argument("--docs", type=int, default=1, help="distill: documents per row")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--sources", action="store_true", help="also attribute kernels to source lines")
    distill_step.add_remat_argument(parser)
    args = parser.parse_args()
    if args.tiny:
        args.shape, args.seq = "1x128", 256
    fn, fn_args = {"gdn": gdn_target, "ssd": ssd_target, "distill": distill_target}[args.target](args)
    what = {"gdn": f"{args.shape} impl {args.impl}", "ssd": f"{args.variant} {args.shape} impl {args.impl}",
            "distill": f"{args.seq} tokens, remat {args.remat}, {args.docs} documents per row"}[args.target]
    print(f"device: {jax.devices()[0].device_kind}; target {args.target} {what}")
    events = profile(fn, fn_args, args.calls)
    report(events, args.calls, args.top)
    if args.sources:
        report_sources(events, args.calls, 2 * args.top)
        shutil.rmtree(HLO_DUMP, ignore_errors=True)


if __name__ == "__main__":
    main()
