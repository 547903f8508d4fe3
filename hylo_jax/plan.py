"""`hylo plan`: what a run needs per device, without running it.

For each stage (and each candidate context length / remat policy) the fused distillation step is
lowered and compiled ahead of time for the requested mesh from abstract parameters
(`nnx.eval_shape`: nothing is allocated), and XLA's memory analysis gives the bytes per device:
arguments (parameters, optimiser state, teacher, batch) + temporaries (activations, gradients)
+ outputs not aliased to donated inputs. Analytic FLOPs come from `train.flops`, and the
context-parallel communication volume from `parallel.volume`.

The mesh must exist on this machine (real devices, or `XLA_FLAGS=--xla_force_host_platform_device_count=N`
on CPU). CPU numbers are XLA:CPU's buffer assignment: close to, not equal to, the GPU/TPU one (the
fused kernels differ); run `hylo plan` on the target accelerator for the final word.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from hylo_jax.errors import HyloError
from hylo_jax.models.hybrid import ModelSpec
from hylo_jax.parallel import context
from hylo_jax.parallel.volume import fmt_bytes as _fmt
from hylo_jax.sharding import state_shardings
from hylo_jax.train.config import StageConfig
from hylo_jax.train.flops import forward_flops_per_token
from hylo_jax.train.step import Distiller, TrainState, check_batch_divides

# Cheapest recompute first: the first policy that fits is the one to use.
REMAT_ORDER = ("none", "save_attention_out", "dots_no_batch", "dots", "full")


@dataclasses.dataclass(frozen=True)
class PlanRow:
    stage: str
    student: str
    seq_len: int
    remat: str
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    flops_per_step: float
    error: str = ""

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


def _sharded_abstract(state: nnx.State, mesh) -> nnx.State:
    """ShapeDtypeStructs of `state` carrying their NamedShardings (validated: MeshError first)."""
    shardings = state_shardings(state, mesh)
    pure = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                        nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))
    nnx.replace_by_pure_dict(state, pure)
    return state


def compile_step(spec: ModelSpec, teacher: ModelSpec, stage: StageConfig, mesh, *,
                 cp_mode: str = "allgather", load_balance: bool = False):
    """The fused step of `stage` compiled for `mesh` from abstract arguments; returns `Compiled`."""
    check_batch_divides(mesh, stage)
    context.check_sequence(mesh, stage.seq_len, load_balance=load_balance, conv_kernel=spec.conv_kernel)
    spec.check_mesh(mesh)
    teacher.check_mesh(mesh)
    student_model = nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))
    teacher_model = nnx.eval_shape(lambda: teacher.build(nnx.Rngs(1)))
    distiller = Distiller(student_model, teacher_model, stage)
    params = _sharded_abstract(distiller.initial_params, mesh)
    frozen = _sharded_abstract(distiller.frozen, mesh)
    teacher_state = _sharded_abstract(distiller.teacher_state, mesh)
    init = jax.jit(distiller.tx.init).lower(params).compile()
    replicated = NamedSharding(mesh, PartitionSpec())

    def on_mesh(a, s):  # scalars (step counts) come back as single-device shardings
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s if isinstance(s, NamedSharding) else replicated)

    opt_state = jax.tree.map(on_mesh, jax.eval_shape(distiller.tx.init, params), init.output_shardings)
    state = TrainState(jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), params, opt_state)
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "sequence"))
    batch = {k: jax.ShapeDtypeStruct((stage.global_batch_size, stage.seq_len), jnp.int32, sharding=rows)
             for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")}
    with jax.set_mesh(mesh), context.settings(cp_mode, load_balance):
        return distiller.step.lower(state, frozen, teacher_state, batch).compile()


def plan_stage(spec: ModelSpec, teacher: ModelSpec, stage: StageConfig, mesh, *, student: str = "hybrid",
               seq_lens: Sequence[int] = (), remats: Sequence[str] = (), cp_mode: str = "allgather",
               load_balance: bool = False) -> list[PlanRow]:
    """One row per (context length, remat policy) candidate of `stage` (defaults: the stage's own)."""
    out = []
    for seq_len in seq_lens or (stage.seq_len,):
        for remat in remats or (stage.remat or spec.model.remat,):
            s = dataclasses.replace(stage, seq_len=seq_len, remat=remat)
            cand = ModelSpec.create(dataclasses.replace(spec.model, remat=remat), spec.hybrid)
            tokens = s.seq_len * s.global_batch_size
            flops = tokens * (3 * forward_flops_per_token(cand, seq_len) + forward_flops_per_token(teacher, seq_len))
            try:
                mem = compile_step(cand, teacher, s, mesh, cp_mode=cp_mode, load_balance=load_balance
                                   ).memory_analysis()
            except HyloError:
                raise
            except Exception as e:  # noqa: BLE001 - an XLA refusal (e.g. out of memory at compile) is a result
                out.append(PlanRow(s.name, student, seq_len, remat, 0, 0, 0, 0, flops, f"{type(e).__name__}: {e}"))
                continue
            out.append(PlanRow(s.name, student, seq_len, remat, int(mem.argument_size_in_bytes),
                               int(mem.temp_size_in_bytes), int(mem.output_size_in_bytes),
                               int(mem.alias_size_in_bytes), flops))
    return out


def report(rows: Sequence[PlanRow], *, mesh_sizes: dict, device_memory: float | None) -> str:
    """A table of the rows and, per stage, the cheapest candidate that fits `device_memory` bytes."""
    fmt = _fmt
    lines = [f"mesh {mesh_sizes}; bytes per device (XLA memory analysis of the compiled step)", "",
             "| stage | student | seq_len | remat | params+opt+batch | temporaries | peak | TFLOP/step | fits |",
             "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        fits = "-" if device_memory is None or r.error else ("yes" if r.peak_bytes <= device_memory else "no")
        if r.error:
            lines.append(f"| {r.stage} | {r.student} | {r.seq_len} | {r.remat} | {r.error[:80]} | | | "
                         f"{r.flops_per_step / 1e12:.2f} | no |")
            continue
        lines.append(f"| {r.stage} | {r.student} | {r.seq_len} | {r.remat} | {fmt(r.argument_bytes)} | "
                     f"{fmt(r.temp_bytes)} | {fmt(r.peak_bytes)} | {r.flops_per_step / 1e12:.4g} | {fits} |")
    if device_memory is not None:
        lines.append("")
        for stage in dict.fromkeys(r.stage for r in rows):
            ok = [r for r in rows if r.stage == stage and not r.error and r.peak_bytes <= device_memory]
            if not ok:
                lines.append(f"{stage}: nothing fits in {fmt(device_memory)} per device: add devices "
                             "to fsdp/sequence, or shorten the context")
                continue
            best = max(ok, key=lambda r: (r.seq_len, -REMAT_ORDER.index(r.remat) if r.remat in REMAT_ORDER else 0))
            lines.append(f"{stage}: fits at seq_len {best.seq_len} with remat={best.remat} "
                         f"({fmt(best.peak_bytes)} of {fmt(device_memory)} per device)")
    return "\n".join(lines)
