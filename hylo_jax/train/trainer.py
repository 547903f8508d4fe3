"""Staged distillation runs: Stage I (ILD on the all-MLA and the all-linear students), assembly of
the hybrid by the layer plan, Stage II (KD at growing context), held-out evaluation.

Every stage writes RUN/<stage>[-mla|-linear]/ with `ckpt/` (orbax: train state + data-iterator
state, kept every `save_every` steps), `final/` (a model folder, once the stage is done), and its
logs. `run` skips finished stages and resumes an interrupted one from its latest checkpoint, with
the same data order, so a killed run loses nothing but the steps since its last save.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from hylo_jax.checkpoint import load_model, load_teacher, save_model
from hylo_jax.config import MeshConfig, doc, packed_bound, save_yaml, segment_bound
from hylo_jax.convert.upcycle import upcycle, with_energy_ranks
from hylo_jax.data.pipeline import DataConfig, make_dataset
from hylo_jax.errors import CheckpointError, ConfigError, HyloError
from hylo_jax.eval.perplexity import perplexity
from hylo_jax.kernels.attention import resolve_impl
from hylo_jax.models.hybrid import HybridConfig, ModelSpec
from hylo_jax.models.transformer import CausalLM
from hylo_jax.parallel import context
from hylo_jax.sharding import check_divides, make_mesh, path_keys, place
from hylo_jax.train.config import StageConfig
from hylo_jax.train.flops import forward_flops_per_token, peak_flops
from hylo_jax.train.logger import MetricsLogger
from hylo_jax.train.step import Distiller, TrainState, check_batch_divides, host_packing

log = logging.getLogger(__name__)
DTYPE = Literal["float32", "bfloat16"]


class TrainingError(HyloError):
    """Training cannot go on (a non-finite loss or gradient under nan_policy=stop)."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole HyLo run: teacher, plan, data, and the two lists of stages."""

    teacher: str = doc("smollm2", "Teacher to upcycle from (and of Stage I): hylo model folder, HF "
                                  "folder, .gguf, or preset.")
    kd_teacher: str | None = doc(None, "Teacher of the Stage II (KD) stages, e.g. a larger model of the "
                                       "same vocabulary (HyLo: Llama-3.1-8B); None = `teacher`.")
    out: str = doc("runs/hylo", "Run folder (stages, checkpoints, logs).")
    hybrid: HybridConfig = doc(HybridConfig, "The layer plan and mixer sizes.", factory=True)
    data: DataConfig = doc(DataConfig, "Training text (seq_len / batch come from each stage).",
                           factory=True)
    mesh: MeshConfig = doc(MeshConfig, "Device mesh.", factory=True)
    stage1: tuple[StageConfig, ...] = doc((), "ILD stages, each run on the all-MLA and on the "
                                              "all-linear student; empty = upcycle the hybrid directly.")
    stage2: tuple[StageConfig, ...] = doc((), "KD stages on the assembled hybrid, in order.")
    dtype: DTYPE = doc("float32", "Compute dtype of the student.")
    param_dtype: DTYPE = doc("float32", "Storage dtype of the student's parameters.")
    teacher_dtype: DTYPE = doc("float32", "Compute and storage dtype of the frozen teacher.")
    remat: Literal["none", "full", "dots", "dots_no_batch", "save_attention_out"] = doc(
        "none", "Default activation checkpointing (a stage may override it).")
    seed: int = doc(0, "Seed of the freshly initialised student parameters.")
    eval_rows: int = doc(8, "Held-out rows for the perplexity report.")
    eval_seq_len: int = doc(512, "Tokens per held-out row.")
    tensorboard: bool = doc(True, "Write TensorBoard event files beside metrics.jsonl.")


# ---------------------------------------------------------------------------------------------
# Models on the mesh.

def respec(model: CausalLM, spec: ModelSpec) -> CausalLM:
    """The same parameters under another spec of identical structure (RoPE, remat, dtype)."""
    graphdef = nnx.split(nnx.eval_shape(lambda: spec.build(nnx.Rngs(0))))[0]
    return nnx.merge(graphdef, nnx.state(model))


def assemble(mla_model: CausalLM, linear_model: CausalLM, teacher: CausalLM, spec: ModelSpec) -> CausalLM:
    """The hybrid of `spec` taking MLA layers from `mla_model`, linear layers and every shared
    parameter (embeddings, norms, MLPs, head) from `linear_model`, kept attention from `teacher`."""
    kinds = spec.layer_kinds()
    sources = {"mla": dict(nnx.to_flat_state(nnx.state(mla_model))),
               "linear": dict(nnx.to_flat_state(nnx.state(linear_model))),
               "attention": dict(nnx.to_flat_state(nnx.state(teacher)))}
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: spec.build(nnx.Rngs(0))))
    filled = {}
    for path, _ in nnx.to_flat_state(abstract):
        keys = path_keys(path)
        is_mixer = keys[:2] == ["model", "layers"] and keys[3] in ("self_attn", "linear_attn")
        kind = kinds[int(keys[2])] if is_mixer else "linear"
        filled[path] = sources["linear" if kind in ("gdn", "mamba2") else kind][path]
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


# ---------------------------------------------------------------------------------------------
# One stage.

class DistillersByBound:
    """The stage's Distiller for each packed bound (`config.packed_bound`) its batches need: built on first use,
    one compiled step each, sharing the parameters and the train state. Only where attention takes cuDNN's
    packed layout (`enabled`); elsewhere, and for batches without segment ids, the stage's own Distiller."""

    def __init__(self, main: Distiller, max_segments: int, make: Callable[[int], Distiller], enabled: bool):
        self.by_bound, self.max_segments, self.make = {max_segments: main}, max_segments, make
        self.enabled = enabled and max_segments > 1

    def for_runs(self, runs: int) -> Distiller:
        """The Distiller for a batch of at most `runs` runs per row (`step.host_packing`; 0: no segment ids)."""
        if self.max_segments and runs > self.max_segments:
            raise ConfigError(f"a batch row holds {runs} segments (documents + padding), more than "
                              f"model.max_segments={self.max_segments} that packed attention takes; raise "
                              "data.max_docs_per_row")
        if not self.enabled or runs == 0:
            return self.by_bound[self.max_segments]
        bound = packed_bound(runs, self.max_segments)
        if bound not in self.by_bound:
            log.info("compiling the step for rows of up to %d segments", bound)
            self.by_bound[bound] = self.make(bound)
        return self.by_bound[bound]


def with_max_segments(model: CausalLM, max_segments: int) -> CausalLM:
    """`model` (a plain transformer) whose attention takes rows of up to `max_segments` segments packed."""
    return respec(model, ModelSpec(dataclasses.replace(model.cfg, max_segments=max_segments)))


def _non_finite(metrics: dict[str, float]) -> list[str]:
    return [k for k, v in metrics.items() if k not in ("finite", "lr") and not np.isfinite(v)]


def train_stage(run: RunConfig, stage: StageConfig, spec: ModelSpec, init: Callable[[], CausalLM],
                teacher: CausalLM, tokenizer, mesh, directory: Path) -> Path:
    """Trains one stage into `directory` (resuming if it has checkpoints); returns its final folder."""
    final = directory / "final"
    if (final / "params").is_dir():
        log.info("[%s] already finished: %s", directory.name, final)
        return final
    check_batch_divides(mesh, stage)
    check_divides(mesh, f"stage {stage.name}: seq_len", stage.seq_len, ("sequence",))
    context.check_sequence(mesh, stage.seq_len, load_balance=run.mesh.load_balance, conv_kernel=spec.conv_kernel)
    spec.check_mesh(mesh)
    hybrid = spec.hybrid if stage.mla_rope is None or spec.hybrid is None else dataclasses.replace(
        spec.hybrid, mla_rope=stage.mla_rope)
    spec = ModelSpec.create(dataclasses.replace(spec.model, remat=stage.remat or run.remat), hybrid)
    student = respec(init(), spec)
    distiller = Distiller(student, teacher, stage)
    cudnn_packed = resolve_impl(spec.model.attention_impl, stage.seq_len, None) == "cudnn" and run.mesh.sequence == 1
    distillers = DistillersByBound(distiller, spec.model.max_segments, lambda bound: Distiller(
        respec(student, spec.with_overrides(max_segments=bound)), with_max_segments(teacher, bound), stage),
        enabled=cudnn_packed)
    state, data_state = distiller.init_state(), None
    manager = ocp.CheckpointManager(
        (directory / "ckpt").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=stage.keep_checkpoints, create=True))
    if manager.latest_step() is not None:
        state, data_state = _restore(manager, state, directory)
        log.info("[%s] resuming at step %d", directory.name, int(state.step))
    data_cfg = dataclasses.replace(run.data, seq_len=stage.seq_len, global_batch_size=stage.global_batch_size)
    batches = make_dataset(data_cfg, tokenizer, data_state)
    tokens = stage.seq_len * stage.global_batch_size
    train_flops = 3 * forward_flops_per_token(spec, stage.seq_len)
    teacher_flops = forward_flops_per_token(ModelSpec(teacher.cfg), stage.seq_len)
    logger = MetricsLogger(directory, directory.name, tokens_per_step=tokens,
                           flops_per_step=tokens * (train_flops + teacher_flops),
                           peak_flops=peak_flops(), tensorboard=run.tensorboard)
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "sequence"))
    start = int(state.step)

    def check(step: int, metrics: dict, bar: tqdm) -> None:
        """Stops (or warns) on a non-finite step, logs, advances the bar: the host's only wait on the device."""
        if not bool(metrics["finite"]):
            bad = _non_finite({k: float(v) for k, v in metrics.items()})
            if stage.nan_policy == "stop":
                raise TrainingError(f"[{directory.name}] step {step}: non-finite {bad}; "
                                    "the update was not saved (nan_policy=skip skips such steps)")
            log.warning("[%s] step %d: non-finite %s, update skipped", directory.name, step, bad)
        if step % stage.log_every == 0 or step == stage.steps:
            bar.write(logger.log(step, {k: float(v) for k, v in metrics.items()}))
        bar.update(1)

    try:
        cp = context.settings(run.mesh.context_parallel, run.mesh.load_balance, run.mesh.cp_attention)
        with jax.set_mesh(mesh), cp, tqdm(total=stage.steps, initial=start, desc=directory.name,
                                           disable=jax.process_index() != 0, dynamic_ncols=True) as bar:
            # step n is checked after step n + 1 is queued, so the host prepares the next batch while the device
            # runs; a save step is checked at once (its state is saved before the next step donates it)
            unchecked = None
            for step in range(start + 1, stage.steps + 1):
                batch, runs = host_packing(next(batches))
                step_of = distillers.for_runs(runs)
                batch = {k: None if v is None else jax.make_array_from_process_local_data(sharding, v)
                         for k, v in batch.items()}
                state, metrics = step_of.run_step(state, batch)
                if unchecked is not None:
                    check(*unchecked, bar)
                unchecked = (step, metrics)
                if step % stage.save_every == 0 or step == stage.steps:
                    check(*unchecked, bar)
                    unchecked = None
                    manager.save(step, args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(batches.get_state())))
        manager.wait_until_finished()
    finally:
        manager.close()
        logger.close()
    save_model(final, distiller.merge(state.params), spec, tokenizer=tokenizer,
               source=f"stage {stage.name} of {run.out}")
    return final


def _restore(manager, state: TrainState, directory: Path) -> tuple[TrainState, dict]:
    mesh = next(x.sharding.mesh for x in jax.tree.leaves(state) if isinstance(x.sharding, NamedSharding))
    replicated = NamedSharding(mesh, PartitionSpec())
    # counters created by jnp.zeros live on one device: restore them replicated on the mesh (a single-device
    # array next to mesh arrays is refused by jit when the mesh spans several processes)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=x.sharding if isinstance(x.sharding, NamedSharding) else replicated), state)
    step = manager.latest_step()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises many types for a foreign or damaged checkpoint
        raise CheckpointError(f"{directory}/ckpt/{step} does not match this stage's model or is "
                              f"damaged ({type(e).__name__}: {e}); delete it to start the stage afresh") from e
    return restored.state, restored.data


# ---------------------------------------------------------------------------------------------
# The whole run.

def run(cfg: RunConfig) -> dict[str, float]:
    """Stage I, assembly, Stage II, evaluation. Returns held-out perplexities."""
    from hylo_jax.data.pipeline import heldout_tokens
    from hylo_jax.info import report

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        save_yaml(cfg, out / "run.yaml")
    mesh = make_mesh(cfg.mesh)
    teacher, tokenizer = load_teacher(cfg.teacher, mesh, dtype=cfg.teacher_dtype, param_dtype=cfg.teacher_dtype)
    if tokenizer is None:
        raise ConfigError(f"teacher {cfg.teacher} has no tokenizer; training needs one")
    max_segments = segment_bound(cfg.data.max_docs_per_row)
    teacher = with_max_segments(teacher, max_segments)
    student_cfg = dataclasses.replace(teacher.cfg, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    cfg = dataclasses.replace(cfg, hybrid=with_energy_ranks(teacher, cfg.hybrid))
    spec = ModelSpec.create(student_cfg, cfg.hybrid)
    every = tuple(range(student_cfg.num_layers))

    def upcycled(plan_spec: ModelSpec) -> Callable[[], CausalLM]:
        return lambda: place(upcycle(teacher, plan_spec, seed=cfg.seed), mesh)

    def chain(stages, plan_spec: ModelSpec, suffix: str, init: Callable[[], CausalLM]) -> Callable[[], CausalLM]:
        for stage in stages:
            final = train_stage(cfg, stage, plan_spec, init, teacher, tokenizer, mesh, out / f"{stage.name}{suffix}")
            init = lambda final=final: load_model(final, mesh)[0]  # noqa: E731
        return init

    if cfg.stage1:
        plans = {"mla": dataclasses.replace(cfg.hybrid, mla_layers=every, attention_layers=()),
                 "linear": dataclasses.replace(cfg.hybrid, mla_layers=(), attention_layers=())}
        trained = {}
        for which, plan in plans.items():
            plan_spec = ModelSpec.create(student_cfg, plan)
            trained[which] = chain(cfg.stage1, plan_spec, f"-{which}", upcycled(plan_spec))
        init = lambda: place(assemble(trained["mla"](), trained["linear"](), teacher, spec), mesh)  # noqa: E731
    else:
        init = upcycled(spec)
    results = {}
    heldout = heldout_tokens(tokenizer, cfg.eval_seq_len, cfg.eval_rows)
    results["teacher_ppl"] = perplexity(teacher, heldout)
    results["student_ppl_before"] = perplexity(respec(upcycled(spec)(), spec), heldout)
    if cfg.kd_teacher:
        teacher, _ = load_teacher(cfg.kd_teacher, mesh, dtype=cfg.teacher_dtype, param_dtype=cfg.teacher_dtype)
        teacher = with_max_segments(teacher, max_segments)
        if teacher.cfg.vocab_size != student_cfg.vocab_size:
            raise ConfigError(f"kd_teacher vocabulary {teacher.cfg.vocab_size} differs from the student's "
                              f"{student_cfg.vocab_size}")
    final_init = chain(cfg.stage2, spec, "", init)
    results["student_ppl_after"] = perplexity(respec(final_init(), spec), heldout)
    if jax.process_index() != 0:
        return results
    print(report(spec))
    print("held-out perplexity (Hamlet): teacher {teacher_ppl:.2f}, student before training "
          "{student_ppl_before:.2f}, after {student_ppl_after:.2f}".format(**results))
    save_yaml(results, out / "results.yaml")
    return results
