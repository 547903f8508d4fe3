"""Multi-GPU scaling of the Stage II distillation step (HyLo-Llama-1B student 8MLA8GDN + Llama-3.2-1B teacher).

Each run is `GPUS:STRATEGY:T` (tokens per sequence):
    dp    data=GPUS, global batch GPUS x T (parameters replicated)
    fsdp  fsdp=GPUS, global batch GPUS x T (parameters, gradients, Adam moments sharded)
    seq   sequence=GPUS, one T-token sequence split across GPUs; MLA all-gathers the latent,
          GDN exchanges chunk states; parameters sharded over the sequence axis (ZeRO-3)
    ring  as seq with MLA ring attention (S-1 ppermutes of the latent, overlapped with compute)
Prints one table: s/step, tokens/s, tokens/s per GPU, MFU (model FLOPs of student fwd+bwd + teacher fwd
against the nominal bf16 peak of all GPUs), compiled peak GiB per GPU, and the strong / weak scaling
efficiency against the 1-GPU run with the same global / per-GPU tokens when one is in the same invocation.
Rows are also appended to `--out` (JSON lines) as they finish. Random weights. `--student llama` swaps in
the all-attention baseline (the teacher's architecture as the student) for the longest-context comparison.
    python benchmarks/scaling.py --runs 1:seq:65536,2:fsdp:65536,2:seq:65536,2:seq:131072,2:ring:131072
    python benchmarks/scaling.py --load-balance --runs 2:seq:131072,2:ring:131072   # zig-zag layout
    python benchmarks/scaling.py --runs 2:seq:262144 --memory-only      # does it fit? compile only
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/scaling.py --tiny   # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import jax  # noqa: E402
from common import print_table  # noqa: E402
from distill_step import add_remat_argument, make_batch, measure_step, specs  # noqa: E402  (sets the GPU memory fraction)
from flax import nnx  # noqa: E402

from hylo_jax.config import MeshConfig  # noqa: E402
from hylo_jax.config import replace as replace_config  # noqa: E402
from hylo_jax.models.hybrid import ModelSpec  # noqa: E402
from hylo_jax.parallel import context  # noqa: E402
from hylo_jax.sharding import make_mesh, place  # noqa: E402
from hylo_jax.train.config import StageConfig  # noqa: E402
from hylo_jax.train.flops import forward_flops_per_token, peak_flops  # noqa: E402
from hylo_jax.train.step import Distiller  # noqa: E402

STRATEGIES = {  # strategy -> (mesh axis that takes the GPUs, global batch = GPUS?, MLA context-parallel mode)
    "dp": ("data", True, "allgather"),
    "fsdp": ("fsdp", True, "allgather"),
    "seq": ("sequence", False, "allgather"),
    "ring": ("sequence", False, "ring"),
}


@dataclasses.dataclass(frozen=True)
class Run:
    gpus: int
    strategy: str
    seq: int

    @classmethod
    def parse(cls, text: str) -> Run:
        try:
            gpus, strategy, seq = text.split(":")
            run = cls(int(gpus), strategy, int(seq))
        except ValueError:
            raise SystemExit(f"bad run {text!r}: expected GPUS:STRATEGY:T, e.g. 2:seq:131072") from None
        if strategy not in STRATEGIES:
            raise SystemExit(f"bad run {text!r}: strategy must be one of {sorted(STRATEGIES)}")
        return run

    @property
    def batch(self) -> int:
        return self.gpus if STRATEGIES[self.strategy][1] else 1


def run_one(run: Run, t_spec, s_spec, *, memory_only: bool, kl_chunk: int, iters: int,
            cp_attention: str = "auto", load_balance: bool = False) -> dict:
    """Build teacher + student sharded on the run's mesh, compile the fused step, time it."""
    axis, _, mode = STRATEGIES[run.strategy]
    if run.gpus > len(jax.devices()):
        raise SystemExit(f"run {run} needs {run.gpus} devices; {len(jax.devices())} present")
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "sequence": 1} | {axis: run.gpus}
    mesh = make_mesh(MeshConfig(**sizes), jax.devices()[: run.gpus])
    s_spec.check_mesh(mesh)
    context.check_sequence(mesh, run.seq, load_balance=load_balance, conv_kernel=s_spec.conv_kernel)
    build = (lambda spec: nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))) if memory_only else (
        lambda spec: place(spec.build(nnx.Rngs(0)), mesh))
    models = [build(spec) for spec in (t_spec, s_spec)]
    teacher, student = models
    stage = dataclasses.replace(StageConfig(), loss="kd", kl_chunk=kl_chunk, steps=10)
    batch = make_batch(run.batch, run.seq, t_spec.model.vocab_size)
    rows = jax.NamedSharding(mesh, jax.P(("data", "fsdp"), "sequence"))
    batch = {k: v if v is None else jax.device_put(v, rows) for k, v in batch.items()}
    with jax.set_mesh(mesh), context.settings(mode, load_balance, cp_attention):
        distiller = Distiller(student, teacher, stage)
        seconds, peak_gib = measure_step(distiller, batch, memory_only=memory_only, iters=iters)
    tokens = run.batch * run.seq
    flops = tokens * (3 * forward_flops_per_token(s_spec, run.seq) + forward_flops_per_token(t_spec, run.seq))
    peak = peak_flops()
    out = {"gpus": run.gpus, "strategy": run.strategy, "batch": run.batch, "seq": run.seq,
           "cp_attention": cp_attention, "load_balance": load_balance, "peak_gib_per_gpu": peak_gib,
           "device": jax.devices()[0].device_kind}
    if seconds is not None:
        out |= {"seconds": seconds, "tokens_per_s": tokens / seconds,
                "mfu": flops / seconds / (peak * run.gpus) if peak else float("nan")}
    return out


def efficiencies(rows: list[dict]) -> None:
    """Fill strong / weak scaling efficiency from the 1-GPU rows of the same invocation."""
    single = {r["batch"] * r["seq"]: r for r in rows if r["gpus"] == 1 and "tokens_per_s" in r}
    for r in rows:
        if r["gpus"] == 1 or "tokens_per_s" not in r:
            continue
        same_global = single.get(r["batch"] * r["seq"])
        same_per_gpu = single.get(r["batch"] * r["seq"] // r["gpus"])
        if same_global:
            r["strong_eff"] = r["tokens_per_s"] / (r["gpus"] * same_global["tokens_per_s"])
        if same_per_gpu:
            r["weak_eff"] = r["tokens_per_s"] / (r["gpus"] * same_per_gpu["tokens_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=None, help="comma-separated GPUS:STRATEGY:T (see above)")
    parser.add_argument("--tiny", action="store_true", help="tiny models (CPU smoke run)")
    parser.add_argument("--memory-only", action="store_true", help="compile and report memory; do not run")
    parser.add_argument("--kl-chunk", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--cp-attention", default="auto", choices=["auto", "xla", "pallas"],
                        help="context-parallel block attention (auto: the Pallas flash block kernel on GPU)")
    parser.add_argument("--load-balance", action="store_true",
                        help="zig-zag token layout on the sequence axis (equal causal attention work per GPU)")
    parser.add_argument("--out", type=Path, default=None, help="append each finished row here (JSON lines)")
    parser.add_argument("--student", default="hybrid", choices=["hybrid", "llama"],
                        help="'llama': the student is the teacher's architecture (the all-attention baseline)")
    add_remat_argument(parser)
    args = parser.parse_args()
    default = "1:seq:512,2:dp:512,2:fsdp:512,2:seq:512,2:seq:1024,2:ring:1024" if args.tiny else (
        "1:seq:65536,2:fsdp:65536,2:seq:65536,2:seq:131072,2:ring:131072")
    runs = [Run.parse(r) for r in (args.runs or default).split(",")]
    t_spec, s_spec = specs(args.tiny, args.remat)
    if args.student == "llama":
        s_spec = ModelSpec(replace_config(t_spec.model, param_dtype="float32", remat=args.remat))
    rows = []
    for run in runs:
        try:
            row = run_one(run, t_spec, s_spec, memory_only=args.memory_only,
                          kl_chunk=128 if args.tiny else args.kl_chunk, iters=args.iters,
                          cp_attention=args.cp_attention, load_balance=args.load_balance)
        except Exception as e:  # running out of memory at long context is a result; anything else is a bug
            if "memory" not in str(e).lower() and "RESOURCE_EXHAUSTED" not in str(e):
                raise
            print(f"{run}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", file=sys.stderr)
            row = {"gpus": run.gpus, "strategy": run.strategy, "batch": run.batch, "seq": run.seq, "error": "OOM"}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
    efficiencies(rows)
    kinds = s_spec.layer_kinds()
    print(f"device: {jax.devices()[0].device_kind} x {len(jax.devices())}; student "
          + ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds)))
          + f" layers, remat {args.remat}, context-parallel attention {args.cp_attention}"
          + (", zig-zag load balance" if args.load_balance else ""))
    print_table(["GPUs", "strategy", "B x T", "s/step", "tokens/s", "tokens/s/GPU", "MFU", "peak GiB/GPU",
                 "strong eff", "weak eff"],
                [[r["gpus"], r["strategy"], f"{r['batch']}x{r['seq']}", r.get("seconds", r.get("error", "-")),
                  r.get("tokens_per_s", "-"),
                  r["tokens_per_s"] / r["gpus"] if "tokens_per_s" in r else "-", r.get("mfu", "-"),
                  r.get("peak_gib_per_gpu", "-"), r.get("strong_eff", "-"), r.get("weak_eff", "-")]
                 for r in rows])


if __name__ == "__main__":
    main()
