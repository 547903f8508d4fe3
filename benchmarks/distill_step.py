"""Stage II distillation step: HyLo-Llama-1B-shaped student (8MLA8GDN) + Llama-3.2-1B-shaped teacher.

Prints one table: seconds/step in the trainer's loop (each step queued before the host waits on the last;
"synced": one step waited for, as sessions 1-9 reported it), tokens/s, MFU (student fwd+bwd + teacher fwd
model FLOPs against the device's nominal bf16 peak, from the first) and peak device memory, with the dense
KL (full [T, vocab] logits) and the logit-free chunked KL, at 8K and 32K tokens. Random weights. A step takes
--batch rows (default 1) in --accum microbatches run one after the other before one optimiser update
(`StageConfig.grad_accum`): how a device takes its share of the recipe's 32 rows at 8K.
    python benchmarks/distill_step.py                 # on the GPU
    python benchmarks/distill_step.py --seq 8192 --batch 4 --accum 4 --kl chunked
    python benchmarks/distill_step.py --memory-only   # compiled memory of each variant, no run (CPU ok)
    python benchmarks/distill_step.py --tiny          # CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The 32K step compiles to ~62 GiB: more than JAX's default 75% share of an 80 GB GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, time_jax, time_jax_one_ahead  # noqa: E402

from hylo_jax.config import MAX_DOCS_PER_ROW, from_dict, load_yaml, packed_bound, segment_bound  # noqa: E402
from hylo_jax.config import replace as replace_config  # noqa: E402
from hylo_jax.models.gated_deltanet import GDNConfig  # noqa: E402
from hylo_jax.models.hybrid import HybridConfig, ModelSpec  # noqa: E402
from hylo_jax.models.mla import MLAConfig  # noqa: E402
from hylo_jax.models.transformer import REMAT_POLICIES  # noqa: E402
from hylo_jax.train.config import StageConfig  # noqa: E402
from hylo_jax.train.flops import forward_flops_per_token, peak_flops  # noqa: E402
from hylo_jax.train.step import Distiller, TrainState, host_packing  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def specs(tiny: bool, remat: str = "full", docs: int = 1) -> tuple[ModelSpec, ModelSpec]:
    """(teacher, student) specs in bf16; the student (fp32 parameters) rematerialised per `remat`; attention
    takes rows of `docs` documents in the smallest packed layout that holds them, as the trainer picks it."""
    if tiny:
        from hylo_jax.config import ModelConfig

        teacher = ModelConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_layers=4,
                              num_heads=4, num_kv_heads=2, head_dim=32, tie_word_embeddings=True)
        plan = HybridConfig(mla_layers=(0, 2), mla=MLAConfig(q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=16,
                                                              qk_rope_head_dim=16, v_head_dim=32),
                            gdn=GDNConfig(num_heads=2, head_k_dim=32), tie_word_embeddings=False)
    else:
        teacher = from_dict(type(specs(True)[0].model), load_yaml(CONFIGS / "teachers/llama-3.2-1b.yaml")["model"])
        plan = from_dict(HybridConfig, load_yaml(CONFIGS / "hylo-llama-1b-8mla8.yaml")["hybrid"])
    teacher = replace_config(teacher, dtype="bfloat16", param_dtype="bfloat16",
                             max_segments=packed_bound(docs, segment_bound(MAX_DOCS_PER_ROW)))
    student = replace_config(teacher, param_dtype="float32", remat=remat)
    return ModelSpec(teacher), ModelSpec.create(student, plan)


def add_remat_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--remat", default="full", choices=["none", *sorted(REMAT_POLICIES)],
                        help="student remat policy (model.remat); 'none' keeps every activation")


def make_batch(batch: int, seq: int, vocab: int, docs: int = 1) -> dict[str, jax.Array]:
    """Rows of `docs` equal documents with their segment ids, as the trainer sends them (none for one document
    per row: `host_packing`)."""
    tok = np.random.default_rng(0).integers(0, vocab, (batch, seq + 1))
    ids = np.broadcast_to(1 + np.arange(seq, dtype=np.int32) * docs // seq, (batch, seq))
    positions = np.broadcast_to(np.arange(seq) - np.searchsorted(ids[0], ids[0]), (batch, seq))
    host = {"tokens": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": ids, "positions": positions,
            "loss_mask": np.ones((batch, seq), np.int32)}
    return {k: None if v is None else jnp.asarray(v) for k, v in host_packing(host)[0].items()}


def compiled_peak_gib(compiled) -> float:
    """Peak device memory of a compiled step: temporaries + arguments + outputs - donated aliases
    (the four terms are printed to stderr)."""
    mem = compiled.memory_analysis()
    gib = 2**30
    print(f"  memory GiB: temp {mem.temp_size_in_bytes / gib:.2f}, arguments {mem.argument_size_in_bytes / gib:.2f},"
          f" outputs {mem.output_size_in_bytes / gib:.2f}, aliased {mem.alias_size_in_bytes / gib:.2f}",
          file=sys.stderr)
    return (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes) / 2**30


def measure_step(distiller: Distiller, batch: dict, *, memory_only: bool, iters: int = 5
                 ) -> tuple[tuple[float, float] | None, float]:
    """((seconds per step in the trainer's loop, median seconds of one step waited for) or None with
    `memory_only`, compiled peak GiB) of `distiller`'s step. The trainer queues each step before it waits on
    the last one's metrics, so the first number is its steady state; the second adds the device's idle gap
    between a step's end and the next one's launch."""
    if memory_only:
        params = distiller.initial_params
        state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(distiller.tx.init, params))
    else:
        state = distiller.init_state()
    peak_gib = compiled_peak_gib(distiller.step.lower(state, distiller.frozen, distiller.teacher_state,
                                                      batch).compile())
    if memory_only:
        return None, peak_gib
    held = [state]  # run_step donates its state: thread it through the timed calls

    def step():
        held[0], metrics = distiller.run_step(held[0], batch)
        return metrics

    return (time_jax_one_ahead(step, warmup=1, iters=iters), time_jax(step, warmup=0, iters=iters)), peak_gib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--memory-only", action="store_true", help="compile and report memory; do not run")
    parser.add_argument("--seq", default=None, help="comma-separated sequence lengths (default 8192,32768)")
    parser.add_argument("--docs", type=int, default=1, help="documents packed in each row (default 1)")
    parser.add_argument("--batch", type=int, default=1, help="rows per step (default 1)")
    parser.add_argument("--accum", type=int, default=1, help="microbatches per step (default 1)")
    parser.add_argument("--kl", default="dense,chunked", help="comma list of the KL variants to run")
    add_remat_argument(parser)
    args = parser.parse_args()
    t_spec, s_spec = specs(args.tiny, args.remat, args.docs)
    seqs = [int(s) for s in (args.seq or ("256,512" if args.tiny else "8192,32768")).split(",")]
    build = (lambda spec: nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))) if args.memory_only else (
        lambda spec: spec.build(nnx.Rngs(0)))
    teacher, student = build(t_spec), build(s_spec)
    peak = peak_flops()
    rows = []
    for seq in seqs:
        batch = make_batch(args.batch, seq, t_spec.model.vocab_size, args.docs)
        shape, tokens = f"{args.batch}x{seq}" + (f" in {args.accum}" if args.accum > 1 else ""), args.batch * seq
        flops = tokens * (3 * forward_flops_per_token(s_spec, seq) + forward_flops_per_token(t_spec, seq))
        variants = {"dense": ("dense KL", 0), "chunked": ("chunked KL", 2048 if not args.tiny else 128)}
        for name, chunk in (variants[v] for v in args.kl.split(",")):
            stage = StageConfig(loss="kd", kl_chunk=chunk, steps=10, global_batch_size=args.batch,
                                grad_accum=args.accum)
            distiller = Distiller(student, teacher, stage)
            try:
                timings, peak_gib = measure_step(distiller, batch, memory_only=args.memory_only)
                if timings is None:
                    rows.append([shape, name, "-", "-", "-", "-", peak_gib])
                    continue
                seconds, synced = timings
                mfu = flops / seconds / peak if peak else float("nan")
                rows.append([shape, name, seconds, synced, tokens / seconds, mfu, peak_gib])
                print("row:", rows[-1], file=sys.stderr, flush=True)
            except Exception as e:  # OOM at long context is a result, not a crash
                print(f"{shape} {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", file=sys.stderr)
                rows.append([shape, name, "OOM" if "memory" in str(e).lower() else type(e).__name__,
                             "-", "-", "-", "-"])
    print(f"device: {jax.devices()[0].device_kind}; student {s_spec.layer_kinds().count('mla')} MLA + "
          f"{s_spec.layer_kinds().count('gdn')} GDN layers, remat {args.remat}; "
          f"teacher {t_spec.model.num_layers} attention layers; "
          + f"{args.docs} documents per row; B x T [in microbatches]")
    print_table(["B x T", "loss", "s/step", "s/step synced", "tokens/s", "MFU", "compiled peak GiB"], rows)


if __name__ == "__main__":
    main()
