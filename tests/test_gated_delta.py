"""Tests of hylo_jax.kernels.gated_delta: chunked vs token-by-token scan vs the PyTorch references in transformers."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen3_next import modeling_qwen3_next

from hylo_jax.kernels.gated_delta import chunk_state_recurrence, gated_delta_rule, gated_delta_step

# The transformers functions may be wrapped to dispatch to fla kernels; unwrap to the plain PyTorch code.
torch_chunk = inspect.unwrap(modeling_qwen3_next.torch_chunk_gated_delta_rule)
torch_recurrent = inspect.unwrap(modeling_qwen3_next.torch_recurrent_gated_delta_rule)

rule = jax.jit(gated_delta_rule, static_argnames=("scale", "use_qk_l2norm", "chunk_size", "impl"))
step = jax.jit(gated_delta_step, static_argnames=("scale", "use_qk_l2norm"))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def make_inputs(seed, b, t, h, dk, dv, *, normalize_k=True, with_state=True):
    """Realistic inputs: unit-norm keys (unless the kernel normalises), beta in (0, 1), decays exp(g) in (0, 1)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, dk)).astype(np.float32)
    k = rng.standard_normal((b, t, h, dk)).astype(np.float32)
    if normalize_k:
        k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((b, t, h, dv)).astype(np.float32)
    g = -np.logaddexp(0.0, rng.standard_normal((b, t, h)) - 1.0).astype(np.float32)
    beta = (1.0 / (1.0 + np.exp(-rng.standard_normal((b, t, h))))).astype(np.float32)
    s0 = rng.standard_normal((b, h, dk, dv)).astype(np.float32) if with_state else None
    return q, k, v, g, beta, s0


def to_jax(*xs):
    return [None if x is None else jnp.asarray(x) for x in xs]


def to_torch(*xs):
    return [None if x is None else torch.from_numpy(np.asarray(x)) for x in xs]


# (b, t, h, dk, dv, chunk, use_qk_l2norm, with_state)
CASES = [
    (2, 37, 2, 16, 24, 16, True, True),
    (1, 100, 2, 32, 16, 32, False, True),
    (2, 100, 3, 16, 16, 64, True, False),
    (1, 64, 2, 8, 8, 64, False, True),
    (1, 5, 1, 8, 4, 64, False, True),
]


@pytest.mark.parametrize("b,t,h,dk,dv,chunk,l2,with_state", CASES)
def test_chunked_matches_reference_and_transformers(b, t, h, dk, dv, chunk, l2, with_state):
    q, k, v, g, beta, s0 = make_inputs(0, b, t, h, dk, dv, normalize_k=not l2, with_state=with_state)
    jq, jk, jv, jg, jbeta, js0 = to_jax(q, k, v, g, beta, s0)
    kw = dict(initial_state=js0, use_qk_l2norm=l2)
    o_ref, s_ref = rule(jq, jk, jv, jg, jbeta, impl="reference", **kw)
    o_chk, s_chk = rule(jq, jk, jv, jg, jbeta, impl="chunked", chunk_size=chunk, **kw)
    assert o_chk.shape == (b, t, h, dv) and s_chk.shape == (b, h, dk, dv)
    assert o_chk.dtype == jnp.float32 and s_chk.dtype == jnp.float32
    assert rel_err(o_chk, o_ref) <= 1e-5
    assert rel_err(s_chk, s_ref) <= 1e-5

    tq, tk, tv, tg, tbeta, ts0 = to_torch(q, k, v, g, beta, s0)
    tkw = dict(initial_state=ts0, output_final_state=True, use_qk_l2norm_in_kernel=l2)
    o_tr, s_tr = torch_recurrent(tq, tk, tv, tg, tbeta, **tkw)
    o_tc, s_tc = torch_chunk(tq, tk, tv, tg, tbeta, chunk_size=chunk, **tkw)
    for o, s in [(o_ref, s_ref), (o_chk, s_chk)]:
        for o_t, s_t in [(o_tr, s_tr), (o_tc, s_tc)]:
            assert rel_err(o, o_t.numpy()) <= 1e-5
            assert rel_err(s, s_t.numpy()) <= 1e-5


@pytest.mark.parametrize("l2", [False, True])
def test_step_matches_transformers_recurrent(l2):
    q, k, v, g, beta, s0 = make_inputs(1, 2, 1, 3, 16, 8, normalize_k=not l2)
    o, s = step(*to_jax(s0, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0]), use_qk_l2norm=l2)
    tq, tk, tv, tg, tbeta, ts0 = to_torch(q, k, v, g, beta, s0)
    o_t, s_t = torch_recurrent(
        tq, tk, tv, tg, tbeta, initial_state=ts0, output_final_state=True, use_qk_l2norm_in_kernel=l2
    )
    assert o.shape == (2, 3, 8) and s.shape == (2, 3, 16, 8)
    assert rel_err(o, o_t[:, 0].numpy()) <= 1e-5
    assert rel_err(s, s_t.numpy()) <= 1e-5


@pytest.mark.parametrize(
    "t,chunk,l2,segments",
    [(37, 16, True, None), (50, 32, False, [[0] * 16 + [1] * 3 + [0] * 31, [4] * 40 + [2] * 10])],
)
def test_gradients_chunked_match_reference(t, chunk, l2, segments):
    b, h, dk, dv = 2, 2, 16, 8
    q, k, v, g, beta, s0 = make_inputs(2, b, t, h, dk, dv, normalize_k=not l2)
    rng = np.random.default_rng(3)
    w_o = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.float32)
    w_s = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    seg = None if segments is None else jnp.asarray(segments, jnp.int32)

    def loss(q, k, v, g, beta, s0, impl):
        o, s = gated_delta_rule(
            q, k, v, g, beta, initial_state=s0, segment_ids=seg, use_qk_l2norm=l2, chunk_size=chunk, impl=impl
        )
        return jnp.sum(o * w_o) + jnp.sum(s * w_s)

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(6))), static_argnames="impl")
    args = to_jax(q, k, v, g, beta, s0)
    assert rel_err(loss(*args, impl="chunked"), loss(*args, impl="reference")) <= 1e-5
    g_ref, g_chk = grad(*args, impl="reference"), grad(*args, impl="chunked")
    for name, a, r in zip(["q", "k", "v", "g", "beta", "initial_state"], g_chk, g_ref):
        assert np.all(np.isfinite(np.asarray(a))), name
        assert rel_err(a, r) <= 1e-4, name


def test_chunk_state_recurrence_vjp_matches_autodiff_of_the_plain_loop():
    """The hand-written reverse recurrence against jax.grad of a Python loop over the chunks."""
    n, b, h, c, dk, dv = 5, 2, 3, 4, 8, 6
    rng = np.random.default_rng(7)
    u, w, k = (jnp.asarray(rng.standard_normal(shape), jnp.float32) * 0.5
               for shape in [(b, h, n, c, dv), (b, h, n, c, dk), (b, h, n, c, dk)])
    decay = jnp.asarray(rng.uniform(0.2, 1.0, (b, h, n)), jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)
    weights = [jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in [(b, h, n, dk, dv), (b, h, n, c, dv), (b, h, dk, dv)]]

    def loop(u, w, k, decay, s):  # chunks on axis 2
        states, deltas = [], []
        for i in range(n):
            delta = u[:, :, i] - jnp.einsum("bhik,bhkv->bhiv", w[:, :, i], s)
            states.append(s)
            deltas.append(delta)
            s = decay[:, :, i][..., None, None] * s + jnp.einsum("bhik,bhiv->bhkv", k[:, :, i], delta)
        return jnp.stack(states, axis=2), jnp.stack(deltas, axis=2), s

    def loss(fn, *args):
        return sum(jnp.sum(out * wt) for out, wt in zip(fn(*args), weights))

    args = (u, w, k, decay, s0)
    for ours, plain in zip(chunk_state_recurrence(*args), loop(*args)):
        assert rel_err(ours, plain) <= 1e-6
    grads = jax.grad(functools.partial(loss, chunk_state_recurrence), argnums=tuple(range(5)))(*args)
    expected = jax.grad(functools.partial(loss, loop), argnums=tuple(range(5)))(*args)
    for name, a, r in zip(["u", "w", "k", "decay", "state"], grads, expected):
        assert rel_err(a, r) <= 1e-5, name


def test_strong_decay_is_finite():
    """Large negative cumulative log-decays: masking before exp keeps values and gradients finite."""
    q, k, v, g, beta, s0 = make_inputs(4, 1, 40, 2, 8, 8)
    g = np.full_like(g, -40.0)
    args = to_jax(q, k, v, g, beta, s0)
    o_ref, s_ref = rule(*args[:5], initial_state=args[5], impl="reference")
    o_chk, s_chk = rule(*args[:5], initial_state=args[5], impl="chunked", chunk_size=32)
    assert rel_err(o_chk, o_ref) <= 1e-5 and rel_err(s_chk, s_ref) <= 1e-5

    def loss(g):
        o, s = gated_delta_rule(*args[:3], g, args[4], initial_state=args[5], chunk_size=32)
        return jnp.sum(o) + jnp.sum(s)

    assert np.all(np.isfinite(np.asarray(jax.jit(jax.grad(loss))(args[3]))))


@pytest.mark.parametrize("impl,chunk", [("reference", 64), ("chunked", 16)])
def test_segment_ids_reset_state(impl, chunk):
    # Three documents with ids 0, 1, 0: boundaries at a chunk start (16) and mid-chunk (19). A change of id resets,
    # so the third document is independent of the first even though they share an id.
    lens = [16, 3, 21]
    t = sum(lens)
    q, k, v, g, beta, s0 = make_inputs(5, 1, t, 2, 16, 8, normalize_k=False)
    seg = jnp.asarray([[0] * lens[0] + [1] * lens[1] + [0] * lens[2]], jnp.int32)
    kw = dict(use_qk_l2norm=True, chunk_size=chunk, impl=impl)
    args = to_jax(q, k, v, g, beta)
    o, s = rule(*args, initial_state=jnp.asarray(s0), segment_ids=seg, **kw)

    starts = np.cumsum([0] + lens)
    for i, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
        init = jnp.asarray(s0) if i == 0 else None  # initial_state only feeds the first document
        o_doc, s_doc = rule(*(x[:, lo:hi] for x in args), initial_state=init, **kw)
        assert rel_err(o[:, lo:hi], o_doc) <= 1e-5, i
    assert rel_err(s, s_doc) <= 1e-5  # the final state is the last document's

    # With a constant id the packed call is just one sequence.
    o_one, s_one = rule(*args, initial_state=jnp.asarray(s0), segment_ids=jnp.zeros_like(seg), **kw)
    o_full, s_full = rule(*args, initial_state=jnp.asarray(s0), **kw)
    assert rel_err(o_one, o_full) <= 1e-6 and rel_err(s_one, s_full) <= 1e-6


def test_prefill_then_decode_matches_full_run():
    t, n, scale = 21, 5, 0.3
    q, k, v, g, beta, s0 = make_inputs(6, 2, t + n, 2, 16, 8, normalize_k=False)
    args = to_jax(q, k, v, g, beta)
    kw = dict(scale=scale, use_qk_l2norm=True)
    o_full, s_full = rule(*args, initial_state=jnp.asarray(s0), chunk_size=16, **kw)
    o_pre, s = rule(*(x[:, :t] for x in args), initial_state=jnp.asarray(s0), chunk_size=16, **kw)
    outs = [o_pre]
    for i in range(t, t + n):
        o_i, s = step(s, *(x[:, i] for x in args), **kw)
        outs.append(o_i[:, None])
    assert rel_err(jnp.concatenate(outs, axis=1), o_full) <= 1e-5
    assert rel_err(s, s_full) <= 1e-5


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_bf16_inputs(impl):
    q, k, v, g, beta, s0 = make_inputs(7, 2, 45, 2, 32, 32, normalize_k=False)
    args32 = to_jax(q, k, v, g, beta)
    args16 = [x.astype(jnp.bfloat16) for x in args32]
    kw = dict(initial_state=jnp.asarray(s0), use_qk_l2norm=True, chunk_size=16, impl=impl)
    o16, s16 = rule(*args16, **kw)
    o32, s32 = rule(*args32, **kw)
    assert o16.dtype == jnp.bfloat16 and s16.dtype == jnp.float32
    assert rel_err(o16, o32) <= 3e-2
    assert rel_err(s16, s32) <= 3e-2
    # Against fp32 maths on the same (bf16-rounded) inputs the only extra error is the output rounding.
    o_up, s_up = rule(*(x.astype(jnp.float32) for x in args16), **kw)
    assert rel_err(o16, o_up) <= 1e-2
    assert rel_err(s16, s_up) <= 1e-5


def test_bad_arguments_raise():
    q, k, v, g, beta, s0 = to_jax(*make_inputs(8, 2, 10, 2, 8, 4))
    call = functools.partial(gated_delta_rule, q, k, v, g, beta)
    with pytest.raises(ValueError, match="dimension 'dk'"):
        gated_delta_rule(q, k[..., :4], v, g, beta)
    with pytest.raises(ValueError, match="dimension 'heads'"):
        gated_delta_rule(q, k, v[:, :, :1], g, beta)
    with pytest.raises(ValueError, match="dimension 'time'"):
        gated_delta_rule(q, k, v, g, beta[:, :5])
    with pytest.raises(ValueError, match="g must have rank 3"):
        gated_delta_rule(q, k, v, g[..., None], beta)
    with pytest.raises(ValueError, match="dimension 'dv'"):
        call(initial_state=s0[..., :2])
    with pytest.raises(ValueError, match="dimension 'batch'"):
        call(segment_ids=jnp.zeros((3, 10), jnp.int32))
    for bad in (48, 0, -16):
        with pytest.raises(ValueError, match="chunk_size must be a positive power of two"):
            call(chunk_size=bad)
    with pytest.raises(ValueError, match="unknown impl 'triton'"):
        call(impl="triton")
    with pytest.raises(ValueError, match="dimension 'dv'"):
        gated_delta_step(s0, q[:, 0], k[:, 0], v[:, 0, :, :2], g[:, 0], beta[:, 0])


@pytest.mark.parametrize("c", [16, 64])
def test_lower_inverse_matches_lapack_value_and_gradients(c):
    """Our block-recursive inverse (used instead of LAPACK trsm, which can deadlock on CPU) and its VJP are
    exact, also for chunk-sized systems shaped like the delta rule's (entries beta k_i.k_j e^{G_i-G_j},
    |entries| <= 1)."""
    from jax import lax

    from hylo_jax.kernels.gated_delta import lower_inverse

    k = jax.random.split(jax.random.key(7), 3)
    keys = jax.random.normal(k[0], (2, 3, c, 8))
    keys = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
    beta = jax.random.uniform(k[1], (2, 3, c, 1))
    m = beta * jnp.einsum("...ik,...jk->...ij", keys, keys) * 0.98 ** jnp.abs(jnp.arange(c)[:, None] - jnp.arange(c))
    w = jax.random.normal(k[2], (2, 3, c, c))

    def ref(m):
        eye = jnp.broadcast_to(jnp.eye(c), m.shape)
        return lax.linalg.triangular_solve(m, eye, left_side=True, lower=True, unit_diagonal=True)

    t = lower_inverse(m)
    assert rel_err(t, ref(m)) <= 1e-5
    want = jax.grad(lambda m: jnp.sum(ref(m) * w))(m)
    # only the strictly lower triangle of m is an input: compare that part of its gradient
    got = jax.grad(lambda m: jnp.sum(lower_inverse(m) * w))(m)
    assert rel_err(jnp.tril(got, -1), jnp.tril(want, -1)) <= 1e-5


def test_matmul_vjp_is_the_einsum_vjp():
    """`matmul`'s own VJP equals autodiff of the einsum in fp32, and in bf16 agrees to bf16 rounding."""
    from hylo_jax.kernels.gated_delta import matmul

    a = jax.random.normal(jax.random.key(0), (2, 3, 8, 16))
    b = jax.random.normal(jax.random.key(1), (2, 3, 16, 5))
    w = jax.random.normal(jax.random.key(2), (2, 3, 8, 5))
    spec = "xnik,xnkv->xniv"
    want = jax.grad(lambda a, b: jnp.sum(jnp.einsum(spec, a, b) * w), argnums=(0, 1))(a, b)
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
        got = jax.grad(lambda a, b: jnp.sum(matmul(spec, a, b, dtype) * w), argnums=(0, 1))(a, b)
        for g, r in zip(got, want):
            assert g.dtype == jnp.float32 and rel_err(g, r) <= tol
