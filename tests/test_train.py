"""Distillation losses and the fused train step on tiny teacher/student pairs (CPU, fp32)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from flax import nnx
from jax.flatten_util import ravel_pytree

from hylo_jax.config import ModelConfig, packed_bounds
from hylo_jax.convert.upcycle import upcycle
from hylo_jax.errors import ConfigError
from hylo_jax.models.gated_deltanet import GDNConfig
from hylo_jax.models.hybrid import HybridConfig, ModelSpec
from hylo_jax.models.mla import MLAConfig
from hylo_jax.models.transformer import CausalLM
from hylo_jax.train.config import StageConfig
from hylo_jax.train.losses import chunked_kd, forward_kl, ild_loss
from hylo_jax.train.step import (
    Distiller,
    accumulated_value_and_grad,
    distill_loss,
    host_packing,
    make_optimizer,
    split_student,
)

TEACHER = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=8)
PLAN = HybridConfig(mla_layers=(1,), linear="gdn",
                    mla=MLAConfig(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=4, qk_rope_head_dim=4,
                                  v_head_dim=8),
                    gdn=GDNConfig(num_heads=2, head_k_dim=8, chunk_size=8))


@pytest.fixture(scope="module")
def pair():
    teacher = CausalLM(TEACHER, rngs=nnx.Rngs(1))
    return teacher, upcycle(teacher, ModelSpec.create(TEACHER, PLAN), seed=0)


def make_batch(b=2, t=24, seed=0):
    tok = np.random.default_rng(seed).integers(0, TEACHER.vocab_size, (b, t + 1))
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2:] = 2  # two documents per row
    pos = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])[None].repeat(b, 0)
    mask = np.ones((b, t), np.int32)
    mask[:, t // 2 - 1] = 0  # no target across the boundary
    return {k: jnp.asarray(v) for k, v in dict(tokens=tok[:, :-1], targets=tok[:, 1:], segment_ids=seg,
                                               positions=pos, loss_mask=mask).items()}


@pytest.mark.parametrize("t, chunk, temperature, ce_weight", [(24, 8, 2.0, 0.5), (24, 7, 1.0, 0.0), (5, 16, 2.0, 0.0)])
def test_chunked_kd_equals_dense(t, chunk, temperature, ce_weight):
    """Values and gradients (through its hand-formed backward) = the dense losses under autodiff."""
    k = jax.random.split(jax.random.key(0), 5)
    ht, hs = jax.random.normal(k[0], (2, t, 16)), jax.random.normal(k[1], (2, t, 12))
    wt, ws = jax.random.normal(k[2], (16, 40)), jax.random.normal(k[3], (12, 40))
    targets = jax.random.randint(k[4], (2, t), 0, 40)
    mask = jnp.ones((2, t)).at[0, : t // 3].set(0)

    def dense(hs, ws):
        logits = hs @ ws
        kl = forward_kl(ht @ wt, logits, temperature=temperature, mask=mask)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        ce = jnp.sum(nll * mask) / jnp.sum(mask)
        return kl + ce_weight * ce, kl, ce

    def chunked(hs, ws):
        return chunked_kd(ht, wt, hs, ws, targets, mask, chunk=chunk, temperature=temperature, ce_weight=ce_weight)

    for a, b in zip(chunked(hs, ws), dense(hs, ws), strict=True):
        assert rel_err(a, b) <= 1e-5
    g_chunked = jax.grad(lambda h, w: chunked(h, w)[0], argnums=(0, 1))(hs, ws)
    g_dense = jax.grad(lambda h, w: dense(h, w)[0], argnums=(0, 1))(hs, ws)
    for a, b in zip(g_chunked, g_dense, strict=True):
        assert rel_err(a, b) <= 1e-5
    g_jit = jax.jit(jax.grad(lambda h, w: 3.0 * chunked(h, w)[0], argnums=(0, 1)))(hs, ws)
    for a, b in zip(g_jit, g_dense, strict=True):
        assert rel_err(a, 3.0 * b) <= 1e-5


@pytest.mark.parametrize("loss", [pytest.param("kd", marks=pytest.mark.slow), "ild"])  # kd: ~2 min on CI
def test_fused_step_gradients_equal_separate_passes(pair, loss):
    """The fused step differentiates exactly the student loss given the teacher's outputs."""
    teacher, student = pair
    stage = StageConfig(loss=loss, kl_chunk=8, trainable="self_attn|linear_attn")
    batch = make_batch()
    graphdef, trainable, frozen = split_student(student, stage)
    fused = jax.grad(lambda p: distill_loss(nnx.merge(graphdef, p, frozen), teacher, batch, stage)[0])(trainable)

    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    if loss == "kd":  # teacher logits computed first, outside the differentiated function
        t_logits = teacher(batch["tokens"], **kw)
        separate = jax.grad(lambda p: forward_kl(
            t_logits, nnx.merge(graphdef, p, frozen)(batch["tokens"], **kw), mask=batch["loss_mask"]))(trainable)
    else:
        hidden, mixed = teacher.model.trace(batch["tokens"], **kw)

        def ild(p):
            outs, s_mixed = nnx.merge(graphdef, p, frozen).model.teacher_forced(hidden[:-1], **kw)
            return ild_loss(outs, hidden[1:], s_mixed, mixed, jnp.ones(batch["tokens"].shape))

        separate = jax.grad(ild)(trainable)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(separate), strict=True):
        assert rel_err(a, b) <= 1e-5


def test_ild_layer_gradients_are_local(pair):
    """With teacher forcing, layer l's ILD term has zero gradient for every other layer."""
    teacher, student = pair
    batch = make_batch()
    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    hidden, mixed = teacher.model.trace(batch["tokens"], **kw)
    graphdef, params, rest = nnx.split(student, nnx.Param, ...)
    mask = jnp.ones(batch["tokens"].shape)
    for layer in range(TEACHER.num_layers):
        def term(p, layer=layer):
            outs, s_mixed = nnx.merge(graphdef, p, rest).model.teacher_forced(hidden[:-1], **kw)
            return ild_loss(outs[layer:layer + 1], hidden[layer + 1:layer + 2], s_mixed[layer:layer + 1],
                            mixed[layer:layer + 1], mask)

        grads = nnx.to_flat_state(jax.grad(term)(params))
        for path, g in grads:
            keys = [getattr(k, "key", k) for k in path]
            own = keys[:3] == ["model", "layers", layer]
            norm = float(jnp.abs(g.get_value()).max())
            if keys[:2] == ["model", "layers"] and not own:
                assert norm == 0.0, path
            if own and keys[3] == "mlp":
                assert norm > 0.0, path


def test_kd_training_lowers_kl(pair):
    """A real learning check: 40 KD steps on a fixed batch cut the KL to the teacher by 3x."""
    teacher, student = pair
    stage = StageConfig(loss="kd", steps=40, lr=3e-3, warmup_ratio=0.1, kl_chunk=8)
    distiller = Distiller(student, teacher, stage)
    state, batch = distiller.init_state(), make_batch(seed=3)
    first = None
    for _ in range(stage.steps):
        state, metrics = distiller.run_step(state, batch)
        first = float(metrics["kl"]) if first is None else first
    assert float(metrics["kl"]) < first / 3, (first, float(metrics["kl"]))


def test_non_finite_loss_is_reported(pair):
    teacher, student = pair
    bad = jax.tree.map(lambda x: x, student)
    kernel = bad.model.layers[0].mlp.up_proj.kernel
    kernel[...] = kernel[...].at[0, 0].set(jnp.nan)
    for policy in ("stop", "skip"):
        distiller = Distiller(bad, teacher, StageConfig(loss="kd", kl_chunk=8, nan_policy=policy))
        state = distiller.init_state()
        before = jax.tree.map(np.asarray, state.params)
        state, metrics = distiller.run_step(state, make_batch())
        assert not bool(metrics["finite"])
        if policy == "skip":  # the update is skipped: parameters unchanged
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params), strict=True):
                np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("max_segments, bounds", [(33, (3, 9, 33)), (5, (2, 5)), (2, (2,)), (1, (1,)), (0, (0,))])
def test_packed_bounds(max_segments, bounds):
    assert packed_bounds(max_segments) == bounds


def test_each_batch_takes_the_smallest_packed_bound_that_holds_its_rows():
    """A Distiller per bound in use, built once; batches without segment ids (runs 0) and every batch where
    attention is not cuDNN's packed layout take the stage's own; more runs than the bound are refused."""
    from hylo_jax.train.trainer import DistillersByBound

    made = []

    def make(bound):
        made.append(bound)
        return f"bound {bound}"

    by_bound = DistillersByBound("main", 33, make, enabled=True)
    picked = [by_bound.for_runs(r) for r in (2, 3, 4, 9, 2, 10, 33, 0)]
    assert picked == ["bound 3"] * 2 + ["bound 9"] * 2 + ["bound 3"] + ["main"] * 3
    assert made == [3, 9]
    off = DistillersByBound("main", 33, make, enabled=False)
    assert off.for_runs(2) == "main" and made == [3, 9]
    with pytest.raises(ConfigError, match="holds 34 segments.*max_segments=33"):
        off.for_runs(34)
    assert DistillersByBound("main", 0, make, enabled=True).for_runs(50) == "main"  # 0: a dense mask, no bound


def test_host_packing_counts_runs_over_rows():
    """The most runs of any row; segment ids go (runs 0) only when every row is one run of a document id
    (> 0): padding and packed rows keep them."""
    one = {"tokens": np.zeros((2, 4)), "segment_ids": np.array([[3, 3, 3, 3], [1, 1, 1, 1]])}
    batch, runs = host_packing(one)
    assert batch["segment_ids"] is None and runs == 0 and one["segment_ids"] is not None
    for ids, want in (([[1, 1, 1, 1], [1, 1, 2, 2]], 2), ([[1, 1, 1, 1], [0, 0, 0, 0]], 1),
                      ([[1, 2, 3, 0], [1, 1, 1, 1]], 4)):
        batch = {"segment_ids": np.array(ids)}
        assert host_packing(batch) == (batch, want)
    assert host_packing({"segment_ids": None}) == ({"segment_ids": None}, 0)


@pytest.mark.slow  # ~45 s on the CI machine
def test_a_distiller_of_another_bound_steps_the_same_state(pair):
    """The per-bound Distillers share one train state: here (XLA attention, where the bound changes nothing)
    one step of each from the same state gives the same loss and parameters."""
    from hylo_jax.train.trainer import respec, with_max_segments

    teacher, student = pair
    spec = ModelSpec.create(TEACHER, PLAN)
    stage = dataclasses.replace(StageConfig(), loss="kd", steps=4)
    main = Distiller(student, teacher, stage)
    other = Distiller(respec(student, spec.with_overrides(max_segments=3)), with_max_segments(teacher, 3), stage)
    assert other.graphdef != main.graphdef
    state = main.init_state()
    copy = jax.tree.map(jnp.copy, state)
    (s1, m1), (s2, m2) = main.run_step(state, make_batch()), other.run_step(copy, make_batch())
    assert float(m1["loss"]) == float(m2["loss"])
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # ~25-30 s a case on the CI machine
@pytest.mark.parametrize("loss", ["ild", "kd"])
def test_step_without_segment_ids_equals_one_segment(pair, loss):
    """A batch of one-document rows gives the same loss with its segment ids as without them."""
    teacher, student = pair
    stage = dataclasses.replace(StageConfig(), loss=loss)
    batch = make_batch()
    batch = {**batch, "segment_ids": jnp.ones_like(batch["segment_ids"]),
             "positions": jnp.broadcast_to(jnp.arange(batch["tokens"].shape[1]), batch["tokens"].shape)}
    with_ids, _ = distill_loss(student, teacher, batch, stage)
    without, _ = distill_loss(student, teacher, host_packing(batch)[0], stage)
    assert rel_err(without, with_ids) <= 1e-6


@pytest.mark.slow  # ~50 s a case on CI; test_parallel_train's default case also steps in 2 microbatches
@pytest.mark.parametrize("loss", ["kd", "ild"])
def test_microbatches_give_the_whole_batch_step(pair, loss):
    """grad_accum=2 over 4 rows gives the loss and gradient of the 4 rows at once (fp32), with microbatches of
    unequal token counts (rows 1 and 3 lose targets and end in padding); the step reports the same loss and
    gradient norm. (Parameters after one Adam step are no check: g / sqrt(v) takes the sign of gradients at
    rounding level.)"""
    teacher, student = pair
    batch = make_batch(b=4)
    mask, seg = np.array(batch["loss_mask"]), np.array(batch["segment_ids"])
    mask[1, :9] = mask[3, 20:] = 0
    seg[3, 18:] = 0
    batch = {**batch, "loss_mask": jnp.asarray(mask), "segment_ids": jnp.asarray(seg)}
    graphdef, trainable, frozen = split_student(student, StageConfig())
    got = {}
    for grad_accum in (1, 2):
        stage = StageConfig(loss=loss, kl_chunk=8, grad_accum=grad_accum)

        def loss_fn(params, rows, stage=stage):
            return distill_loss(nnx.merge(graphdef, params, frozen), teacher, rows, stage)

        (value, _), grads = jax.jit(functools.partial(accumulated_value_and_grad, loss_fn, stage=stage))(
            trainable, batch)
        distiller = Distiller(student, teacher, stage)
        got[grad_accum] = value, grads, distiller.run_step(distiller.init_state(), batch)[1]
    (value, grads, metrics), (value2, grads2, metrics2) = got[1], got[2]
    assert rel_err(value2, value) <= 1e-6
    # over the whole gradient: a gate's is a sum of per-row terms 30x its size, which cancel
    assert rel_err(ravel_pytree(grads2)[0], ravel_pytree(grads)[0]) <= 1e-5
    for name in ("loss", "grad_norm"):
        assert rel_err(metrics2[name], metrics[name]) <= 1e-5, name


def test_grad_accum_must_divide_the_batch():
    with pytest.raises(ConfigError, match="not divisible by grad_accum=3"):
        StageConfig(global_batch_size=8, grad_accum=3)


def test_trainable_regex_must_match(pair):
    teacher, student = pair
    with pytest.raises(ValueError, match="matches no parameter"):
        Distiller(student, teacher, dataclasses.replace(StageConfig(), trainable="nothing_like_this"))


def test_adam_first_moment_in_bfloat16():
    """adam_mu_dtype=bfloat16 stores mu in bf16, nu stays fp32. optax updates from the fp32 moment and rounds it
    for storage: the same update, the same nu, and mu exactly the fp32 run's rounded to bf16 (no tolerance)."""
    params = {"w": jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32).reshape(8, 8)}
    grads = {"w": jnp.cos(jnp.arange(64, dtype=jnp.float32)).reshape(8, 8) / 3}
    runs = {}
    for dtype in ("float32", "bfloat16"):
        tx, _ = make_optimizer(StageConfig(steps=10, warmup_ratio=0.0, lr=1e-2, adam_mu_dtype=dtype))
        update, state = tx.update(grads, tx.init(params), params)
        runs[dtype] = update["w"], state[1][0]  # chain(clip, adamw(scale_by_adam, ...)): ScaleByAdamState
    (u32, adam32), (u16, adam16) = runs["float32"], runs["bfloat16"]
    assert adam16.mu["w"].dtype == jnp.bfloat16 and adam16.nu["w"].dtype == jnp.float32
    np.testing.assert_array_equal(u16, u32)
    np.testing.assert_array_equal(adam16.nu["w"], adam32.nu["w"])
    np.testing.assert_array_equal(adam16.mu["w"], adam32.mu["w"].astype(jnp.bfloat16))
    assert not np.array_equal(adam16.mu["w"].astype(jnp.float32), adam32.mu["w"])  # it was rounded
