"""The fused distillation step: frozen teacher forward + student forward/backward in one jit.

The student's parameters are split into trainable (matching the stage's regex) and frozen; only
the trainable ones are differentiated, updated and donated. The teacher never gets gradients.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jaxtyping import Array, Float

from hylo_jax.kernels.attention import count_segments
from hylo_jax.models.transformer import CausalLM
from hylo_jax.parallel import context
from hylo_jax.parallel.distributed import largest_over_processes
from hylo_jax.sharding import check_divides, path_str
from hylo_jax.train.config import StageConfig
from hylo_jax.train.losses import chunked_kd, forward_kl, ild_loss, token_nll

Batch = dict[str, jax.Array]  # tokens, targets, segment_ids (or None), positions, loss_mask: [b, t] int32


def host_packing(batch: dict) -> tuple[dict, int]:
    """(batch, runs): `runs` is the most runs of equal segment ids in any row of any process (every process gets
    the same answer, so all compile and run the same program). When every row is one document (one run of ids
    > 0) the batch comes back without segment ids and runs 0: the models then take plain causal attention and
    no GDN resets, the same result without cuDNN's packed layout, whose backward clears a float32 workspace of
    max_segments x T rows per attention layer (13 of 228 ms in a HyLo-1B distillation step at 8K tokens)."""
    ids = batch.get("segment_ids")
    if ids is None:
        return batch, 0
    ids = np.asarray(ids)
    runs = count_segments(ids)
    runs = largest_over_processes(0 if runs == 1 and np.all(ids[:, 0] > 0) else runs)
    return ({**batch, "segment_ids": None} if runs == 0 else batch), runs


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # trainable parameters only
    opt_state: optax.OptState


def trainable_filter(pattern: str):
    """nnx filter: parameters whose dotted path matches `pattern` (re.search)."""
    regex = re.compile(pattern)
    return lambda path, value: isinstance(value, nnx.Param) and bool(regex.search(path_str(path)))


def make_optimizer(stage: StageConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW on a linear-warm-up cosine schedule, after global-norm clipping."""
    warmup = max(1, round(stage.warmup_ratio * stage.steps)) if stage.warmup_ratio else 0
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, stage.lr, warmup_steps=warmup, decay_steps=max(stage.steps, warmup + 1),
        end_value=stage.lr * stage.min_lr_ratio)
    parts = [optax.clip_by_global_norm(stage.clip_norm)] if stage.clip_norm else []
    parts.append(optax.adamw(schedule, b1=stage.betas[0], b2=stage.betas[1], weight_decay=stage.weight_decay,
                             mu_dtype=jnp.dtype(stage.adam_mu_dtype)))
    return optax.chain(*parts), schedule


def split_student(student: CausalLM, stage: StageConfig):
    """(graphdef, trainable state, frozen state); error if the regex matches nothing."""
    graphdef, trainable, frozen = nnx.split(student, trainable_filter(stage.trainable), ...)
    if not jax.tree.leaves(trainable):
        raise ValueError(f"stage {stage.name}: trainable={stage.trainable!r} matches no parameter")
    return graphdef, trainable, frozen


def averaged_tokens(batch: Batch, stage: StageConfig) -> Float[Array, "b t"]:
    """The tokens the stage's loss is a mean over (1) or not (0): those of a document (ild), those with a target
    (kd: the loss mask)."""
    if stage.loss == "kd":
        return batch["loss_mask"].astype(jnp.float32)
    ids = batch["segment_ids"]
    return jnp.ones(batch["tokens"].shape, jnp.float32) if ids is None else (ids > 0).astype(jnp.float32)


def distill_loss(student: CausalLM, teacher: CausalLM, batch: Batch, stage: StageConfig
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The stage's loss and its terms (the teacher's outputs carry no gradient)."""
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    if stage.loss == "ild":
        hidden, mixed = teacher.model.trace(batch["tokens"], **kw)
        hidden, mixed = jax.lax.stop_gradient((hidden, mixed))
        outs, s_mixed = student.model.teacher_forced(hidden[:-1], **kw)
        loss = ild_loss(outs, hidden[1:], s_mixed, mixed, averaged_tokens(batch, stage), squared=stage.ild_squared)
        return loss, {"ild": loss}
    h_t = jax.lax.stop_gradient(teacher.hidden_states(batch["tokens"], **kw))
    h_s = student.hidden_states(batch["tokens"], **kw)
    mask = averaged_tokens(batch, stage)
    if stage.kl_chunk:
        loss, kl, ce = chunked_kd(h_t, jax.lax.stop_gradient(teacher.head_kernel()), h_s, student.head_kernel(),
                                  batch["targets"], mask, chunk=stage.kl_chunk, temperature=stage.temperature,
                                  ce_weight=stage.ce_weight)
        return loss, {"kl": kl, "ce": ce}
    s_logits = student.logits(h_s)
    kl = forward_kl(teacher.logits(h_t), s_logits, temperature=stage.temperature, mask=mask)
    ce = jnp.sum(token_nll(s_logits, batch["targets"]) * mask) / jnp.maximum(jnp.sum(mask), 1)
    return kl + stage.ce_weight * ce, {"kl": kl, "ce": ce}


def microbatches(batch: Batch, count: int) -> Batch:
    """[b, t] -> [count, b / count, t]: microbatch j takes rows j, j + count, j + 2 count, ..., so a batch whose
    rows are split over devices in contiguous blocks (b / count divisible by their number) is split in place."""
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)

    return {k: None if v is None else split(v) for k, v in batch.items()}


def accumulated_value_and_grad(loss_fn, params: nnx.State, batch: Batch, stage: StageConfig):
    """((loss, terms), gradients) of `loss_fn(params, rows)` over `batch`, in `stage.grad_accum` microbatches
    run one after the other (a scan). Each microbatch's loss is a mean over its own tokens (`averaged_tokens`);
    weighted by its share of the batch's, n_j / sum n, the sum is the whole batch's loss, terms and gradient.
    Sums in fp32; the gradients return in the parameters' dtypes."""
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    if stage.grad_accum == 1:
        return value_and_grad(params, batch)
    parts = microbatches(batch, stage.grad_accum)
    counts = jnp.sum(averaged_tokens(parts, stage), axis=(1, 2))
    shares = counts / jnp.maximum(jnp.sum(counts), 1)

    def add(total, part):
        rows, share = part
        return jax.tree.map(lambda t, x: t + share * x.astype(jnp.float32), total, value_and_grad(params, rows)), None

    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                         jax.eval_shape(value_and_grad, params, jax.tree.map(lambda x: x[0], parts)))
    (loss, terms), grads = jax.lax.scan(add, zeros, (parts, shares))[0]
    return (loss, terms), jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def check_batch_divides(mesh, stage: StageConfig) -> None:
    """`MeshError` unless each microbatch's rows divide over the mesh's batch axes (data, fsdp)."""
    what = "global_batch_size" if stage.grad_accum == 1 else "global_batch_size / grad_accum"
    check_divides(mesh, f"stage {stage.name}: {what}", stage.global_batch_size // stage.grad_accum, ("data", "fsdp"))


class Distiller:
    """Holds the graph definitions and the compiled step of one stage."""

    def __init__(self, student: CausalLM, teacher: CausalLM, stage: StageConfig):
        self.stage = stage
        self.graphdef, trainable, self.frozen = split_student(student, stage)
        self.teacher_graphdef, self.teacher_state = nnx.split(teacher)
        self.tx, self.schedule = make_optimizer(stage)
        self.initial_params = trainable
        self.step = jax.jit(self._step, donate_argnums=(0,))

    def init_state(self) -> TrainState:
        """Fresh optimiser state over a copy of the student's trainable parameters (the step
        donates its state, so the student module's own arrays stay valid)."""
        params = jax.tree.map(jnp.copy, self.initial_params)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params))

    def merge(self, params: nnx.State) -> CausalLM:
        return nnx.merge(self.graphdef, params, self.frozen)

    def _step(self, state: TrainState, frozen, teacher_state, batch: Batch) -> tuple[TrainState, dict]:
        teacher = nnx.merge(self.teacher_graphdef, teacher_state)
        batch = context.relayout(batch)  # zig-zag tokens when load balancing context parallelism

        def loss_fn(params, rows):
            return distill_loss(nnx.merge(self.graphdef, params, frozen), teacher, rows, self.stage)

        (loss, terms), grads = accumulated_value_and_grad(loss_fn, state.params, batch, self.stage)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if self.stage.nan_policy == "skip":
            keep = functools.partial(jnp.where, finite)
            params = jax.tree.map(keep, params, state.params)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        metrics = {"loss": loss, **terms, "grad_norm": grad_norm, "lr": self.schedule(state.step),
                   "finite": finite}
        return TrainState(state.step + 1, params, opt_state), metrics

    def run_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        return self.step(state, self.frozen, self.teacher_state, batch)
