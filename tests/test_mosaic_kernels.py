"""The Mosaic GPU (Hopper) kernels on CPU. SSD, forward and backward: in the GPU interpreter against the
sequential reference (outputs) and the chunked path (every input cotangent), and lowered for CUDA (the Mosaic
GPU lowering checks layouts, wgmma operands, transfers and shared memory in Python). The GDN recurrence kernels
the same way against the `lax.scan` recurrence, and both as the Pallas path of the whole ops when chosen.

Tolerances (max |a - b| / max |b|): fp32 operands 1e-5 (the interpreter multiplies exactly, so this checks the
algorithm: masks, segments, states, padding, groups, spans, the slots of the pipeline); bf16 operands 2e-2
(matmul operands are rounded to bf16 before their wgmmas, as on the device).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from hylo_jax.kernels import mosaic_common, mosaic_gdn, mosaic_gdn_factors, mosaic_ssd, pallas_common
from hylo_jax.kernels.gated_delta import (
    _fused,
    _in_chunks,
    _outputs,
    _recurrence_inputs,
    chunk_attn,
    chunk_inverse,
    chunk_state_recurrence,
    gated_delta_rule,
)
from hylo_jax.kernels.ssd import _ssd_chunked, _ssd_reference, ssd

F32 = jnp.float32


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def ssd_inputs(seed, b, t, h, g, p, n, dtype, resets=True):
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    x, B, C = (jnp.asarray(z, dtype) for z in (r(b, t, h, p), 0.3 * r(b, t, g, n), 0.3 * r(b, t, g, n)))
    dt = jnp.asarray(0.5 * np.logaddexp(0.0, r(b, t, h)))
    A = jnp.asarray(-np.exp(r(h)))
    reset = jnp.asarray(rng.random((b, t)) < (0.02 if resets else 0.0))
    return x, dt, A, B, C, reset, jnp.asarray(r(b, h, p, n))


CASES = [  # b, t, h, g, p, n, chunk, stages, spans: odd lengths, groups, two slots and three, chunk 128,
    (2, 130, 4, 2, 64, 64, 64, 2, 1),  # the sequence cut into spans run side by side
    (1, 330, 2, 1, 64, 64, 64, 2, 3),
    (1, 300, 2, 1, 64, 128, 64, 3, 2),
    (1, 260, 2, 2, 64, 64, 128, 2, None),
    (1, 150, 2, 1, 128, 64, 64, 2, 2),
]
# each case takes 20-40 s (forward) or 80-110 s (backward) in the interpreter on the 2-core CI machine: the
# default suite runs the forward in fp32 on the second case (groups, resets, three spans) and in bf16 on the first,
# the backward in fp32 on the second; the slow job all
FORWARD_CASES = [(*CASES[1], F32, 1e-5)] + [
    pytest.param(*c, dtype, tol, marks=pytest.mark.slow)
    for c, dtype, tol in [(c, F32, 1e-5) for c in CASES[:1] + CASES[2:]] + [(c, jnp.bfloat16, 2e-2) for c in CASES]]
GRAD_CASES = [  # all slow: SSD on Mosaic is opt-in on Hopper (its bf16 gradients' accuracy, benchmarks/NOTES.md)
    pytest.param(*c, dtype, tol, marks=pytest.mark.slow)
    for c, dtype, tol in [(c, F32, 2e-5) for c in CASES] + [(c, jnp.bfloat16, 2e-2) for c in CASES]]


@pytest.mark.parametrize("b, t, h, g, p, n, chunk, stages, spans, dtype, tol", FORWARD_CASES)
def test_forward_matches_the_sequential_reference(b, t, h, g, p, n, chunk, stages, spans, dtype, tol):
    x, dt, A, B, C, reset, h0 = ssd_inputs(0, b, t, h, g, p, n, dtype)
    y, final = mosaic_ssd.ssd_mosaic(x, dt, A, B, C, reset, h0, chunk, stages=stages, spans=spans,
                                     interpret=mosaic_common.interpret_params())
    y_ref, final_ref = _ssd_reference(x.astype(F32), dt, A, B.astype(F32), C.astype(F32), reset, h0, chunk)
    assert y.dtype == dtype and final.dtype == F32
    assert rel_err(y.astype(F32), y_ref) < tol
    assert rel_err(final, final_ref) < tol


def loss_of(ssd_fn, dy, dfinal):
    def loss(x, dt, A, B, C, reset, h0):
        y, final = ssd_fn(x, dt, A, B, C, reset, h0)
        return jnp.sum(y.astype(F32) * dy) + jnp.sum(final * dfinal)
    return loss


@pytest.mark.parametrize("b, t, h, g, p, n, chunk, stages, spans, dtype, tol", GRAD_CASES)
def test_gradients_match_the_chunked_path(b, t, h, g, p, n, chunk, stages, spans, dtype, tol):
    args = ssd_inputs(3, b, t, h, g, p, n, dtype)
    rng = np.random.default_rng(4)
    dy, dfinal = (jnp.asarray(rng.standard_normal(s), F32) for s in ((b, t, h, p), (b, h, p, n)))
    ours = functools.partial(mosaic_ssd.ssd_mosaic, chunk_size=chunk, stages=stages, spans=spans,
                             interpret=mosaic_common.interpret_params())

    def chunked(x, dt, A, B, C, reset, h0):
        return _ssd_chunked(x.astype(F32), dt, A, B.astype(F32), C.astype(F32), reset, h0, chunk)

    wrt = (0, 1, 2, 3, 4, 6)  # x, dt, A, B, C, h0 (fp32: dA, summed over every token, differs by up to 1.1e-5)
    got = jax.grad(loss_of(ours, dy, dfinal), argnums=wrt)(*args)
    want = jax.grad(loss_of(chunked, dy, dfinal), argnums=wrt)(*args)
    for name, a, w in zip(("x", "dt", "A", "B", "C", "h0"), got, want, strict=True):
        assert a.dtype == args[wrt[("x", "dt", "A", "B", "C", "h0").index(name)]].dtype, name
        assert rel_err(a.astype(F32), w) < tol, name


@pytest.mark.parametrize("b, t, h, g, p, n, chunk, stages, spans", CASES)
def test_forward_and_backward_lower_for_cuda(b, t, h, g, p, n, chunk, stages, spans):
    args = ssd_inputs(1, b, t, h, g, p, n, jnp.bfloat16)
    dy, dfinal = jnp.ones((b, t, h, p), F32), jnp.ones((b, h, p, n), F32)
    ours = functools.partial(mosaic_ssd.ssd_mosaic, chunk_size=chunk, stages=stages, spans=spans)
    grad = jax.jit(jax.grad(loss_of(ours, dy, dfinal), argnums=(0, 1, 2, 3, 4, 6)))
    text = grad.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 2  # the forward (with saved states) and the backward


@pytest.mark.parametrize("p, n, chunk, dtype, reason", [
    (32, 64, 64, jnp.bfloat16, "head_dim=32 is not a multiple of 64"),
    (64, 64, 32, jnp.bfloat16, "chunk_size=32"),
    (128, 256, 64, jnp.bfloat16, "too large"),
    (64, 128, 128, jnp.bfloat16, "shared memory"),
    (64, 64, 64, jnp.float32, "not bf16/fp16"),
])
def test_unsupported_shapes_are_refused(p, n, chunk, dtype, reason):
    args = ssd_inputs(2, 1, 64, 1, 1, p, n, dtype)
    with pytest.raises(ValueError, match=reason):
        mosaic_ssd.ssd_mosaic(*args, chunk)


def test_spans_fill_the_gpu_but_stay_long():
    assert mosaic_ssd.spans_for(batch_heads=128, n_chunks=64, cores=132) == 1  # 4 x 32 heads fill an H100
    assert mosaic_ssd.spans_for(batch_heads=32, n_chunks=256, cores=132) == 4  # 1 x 16K: 128 CTAs, one wave
    assert mosaic_ssd.spans_for(batch_heads=32, n_chunks=16, cores=132) == 2  # spans of >= 8 chunks
    assert mosaic_ssd.spans_for(batch_heads=2, n_chunks=3, cores=132) == 1


@pytest.mark.parametrize("n, forward_slots, backward_slots", [(64, 3, 3), (128, 3, 2)])
def test_ssd_kernels_prefetch_at_mamba2_sizes(n, forward_slots, backward_slots):
    """At head_dim 64, chunk 64, bf16, the chunk loops keep TMA slots in flight (the fp32 state's staging buffer
    has its own scope, dB and dC are bf16): at d_state 128 the backward once fit only one, with no prefetch."""
    def slots(buffers, fixed, mode):
        return mosaic_common.fit(functools.partial(buffers, 64, 64, n, jnp.bfloat16, mode),
                                 fixed(64, 64, n, jnp.bfloat16, mode), 3, 64, "SSD", None)

    assert slots(mosaic_ssd._forward_slots, mosaic_ssd._forward_fixed, "train") == forward_slots
    assert slots(mosaic_ssd._backward_slots, mosaic_ssd._backward_fixed, "grads") == backward_slots


# ----------------------------------------------------------------------------- GDN recurrence with outputs
def recurrence_inputs(seed, b, h, n, c, dk, dv):
    """q, k [b, n*C, h, dk], v [b, n*C, h, dv], beta and G [b, h, n, C] (G decreasing within each chunk), segment
    indices [b, 1, n, C] (a reset in the first chunk) and the initial state [b, h, dk, dv]."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, b, n * c, h, dk)) * 0.1
    v = rng.standard_normal((b, n * c, h, dv))
    beta = 1 / (1 + np.exp(-rng.standard_normal((b, h, n, c))))
    cum = np.cumsum(-rng.uniform(0.0, 0.05, (b, h, n, c)), axis=-1)
    reset = np.zeros((b, n, c), bool)
    reset[0, 0, c // 2] = True
    seg = jnp.asarray(np.cumsum(reset, axis=-1)[:, None], jnp.int32)
    q, k, v, beta, cum = (jnp.asarray(z, F32) for z in (q, k, v, beta, cum))
    return q, k, v, beta, cum, seg, jnp.asarray(rng.standard_normal((b, h, dk, dv)), F32)


def factor(k, beta, cum, seg):
    """Ag = T diag(beta) from k in the op's layout (XLA)."""
    return chunk_inverse(_in_chunks(k, cum.shape[-1]), beta, cum, seg) * beta[..., None, :]


@pytest.mark.slow  # ~100 s a case; the default suite checks every pass through the whole op (fp32, 1e-5)
@pytest.mark.parametrize("b, dv, dtype, tol, vb", [(2, 64, F32, 1e-5, 64), (1, 64, jnp.bfloat16, 2e-2, 32)])
def test_gdn_recurrence_with_outputs_matches_the_scan(b, dv, dtype, tol, vb):
    """The Mosaic GDN passes (the two-warpgroup forward alone and saving S_c and delta_c, the reverse pass from
    o's cotangent, the three gradient passes; value blocks of 64 or 32) with XLA's Ag against the `lax.scan` recurrence
    on u = Ag v, w = (Ag o d_in) k and XLA's outputs with attn = (q k^T) o E: o, the final state, S_c, delta_c and
    every cotangent (q, k, v, beta, G, initial state)."""
    args = recurrence_inputs(0, b, 2, 3, 64, 64, dv)
    q, k, v, beta, cum, seg, state = args
    passes = mosaic_gdn.kernels(dtype, mosaic_common.interpret_params(), vb=vb)
    ours = _fused(passes, None, jnp.dtype(dtype), False)

    def reference(q, k, v, beta, cum, seg, state):
        ag = factor(k, beta, cum, seg)
        v, k, q = (_in_chunks(x, 64) for x in (v, k, q))
        u, w, k_out, decay, q_in = _recurrence_inputs(ag, v, k, q, cum, seg, F32, F32)
        attn = chunk_attn(q, k, cum, seg)
        return _outputs(chunk_state_recurrence, F32)(u, w, k_out, decay, state, q_in, attn)

    want = reference(*args)
    segments = seg[:, 0].reshape(b, -1).astype(F32)
    ag = factor(k, beta, cum, seg)
    saving = passes.forward_saving(ag, v, k, q, cum, segments, state)
    for got in (ours(*args), saving[:2]):
        for a, w in zip(got, want, strict=True):
            assert rel_err(a.astype(F32), w) < tol
    u, w, k_out, decay, _ = _recurrence_inputs(ag, *(_in_chunks(x, 64) for x in (v, k, q)), cum, seg, F32, F32)
    states, deltas, _ = chunk_state_recurrence(u, w, k_out, decay, state)
    assert rel_err(saving[2].astype(F32), states) < tol
    assert rel_err(saving[3].astype(F32), deltas) < tol

    def loss(fn):
        def f(q, k, v, beta, cum, state):
            o, final = fn(q, k, v, beta, cum, seg, state)
            return jnp.sum(jnp.sin(o.astype(F32))) + jnp.sum(final * final)
        return f

    differentiable = (q, k, v, beta, cum, state)
    got = jax.grad(loss(ours), argnums=range(6))(*differentiable)
    want = jax.grad(loss(reference), argnums=range(6))(*differentiable)
    for name, a, w in zip(("q", "k", "v", "beta", "G", "state"), got, want, strict=True):
        assert rel_err(a, w) < tol, name


@pytest.mark.parametrize("vb, given_state, segmented", [(64, True, True), (32, True, True), (64, False, True),
                                                        (64, False, False)])
def test_gdn_forward_alone_matches_the_scan(vb, given_state, segmented):
    """The forward where nothing is saved (fp32, 1e-5) for queries scale * q, asked to carry S^T: with value blocks
    of 64 it does (the products' left operands from registers), with 32 it holds S as the saving forward does;
    from a given state or from none (zeros, not loaded); with resets, or with none (no segment index: none loaded,
    nothing masked)."""
    q, k, v, beta, cum, seg, state = recurrence_inputs(1, 1, 2, 3, 64, 64, 64)
    seg = seg if segmented else jnp.zeros_like(seg)
    scale = 0.3
    ag = factor(k, beta, cum, seg)
    o, final = mosaic_gdn.kernels(F32, mosaic_common.interpret_params(), vb=vb, scale=scale).forward(
        ag, v, k, q, cum, seg[:, 0].reshape(1, -1).astype(F32) if segmented else None, state if given_state else None)
    v, k, q = (_in_chunks(x, 64) for x in (v, k, q))
    u, w, k_out, decay, q_in = _recurrence_inputs(ag, v, k, q, cum, seg, F32, F32)
    state = state if given_state else jnp.zeros_like(state)
    want = _outputs(chunk_state_recurrence, F32)(u, w, k_out, decay, state, q_in, chunk_attn(q, k, cum, seg))
    assert rel_err(o, want[0] * scale) < 1e-5 and rel_err(final, want[1]) < 1e-5


@pytest.mark.slow  # ~1 min on the CI machine
def test_two_warpgroup_kernels_have_no_races():
    """The two-warpgroup kernels in the GPU interpreter with race detection (each call's own): the GDN forward
    (saving; alone, carrying S^T) and reverse pass, the SSD forward (y, train) and gradient kernel; and the
    chunk-factor kernel's prefetching walk. Every shared-memory buffer one warpgroup writes and the other reads
    (or TMA writes while the kernel reads the other slot) is ordered by a barrier (a removed wait is reported)."""
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    def no_races(out):
        jax.block_until_ready(out)
        return not gpu_callbacks.get_races().races_found

    params = InterpretGPUParams(detect_races=True)
    q, k, v, beta, cum, seg, state = recurrence_inputs(0, 1, 1, 3, 64, 64, 64)
    ag = factor(k, beta, cum, seg)
    segments = seg[:, 0].reshape(1, -1).astype(F32)
    passes = mosaic_gdn.kernels(F32, params, vb=32)
    o, final, *saved = passes.forward_saving(ag, v, k, q, cum, segments, state)
    assert no_races(saved)
    assert no_races(passes.reverse(ag, k, q, cum, segments, jnp.ones_like(o), jnp.ones_like(final)))
    s_t_carried = mosaic_gdn.kernels(F32, params, vb=64).forward(ag, v, k, q, cum, segments, None)  # zero start
    assert no_races(s_t_carried)
    k_b, *gates = factor_inputs(0, 1, 1, 3, 64, F32, 0.0)  # three chunks a CTA: the keys' two slots, one reused
    assert no_races(mosaic_gdn_factors.chunk_factor(k_b, *gates, save_t=True, chunks_per_cta=3, interpret=params))

    x, dt, A, B, C, reset, h0 = ssd_inputs(0, 1, 130, 2, 1, 64, 64, F32)

    def ssd_loss(x, dt, B, C):
        y, final = mosaic_ssd.ssd_mosaic(x, dt, A, B, C, reset, h0, chunk_size=64, spans=1, interpret=params)
        return jnp.sum(jnp.sin(y)) + jnp.sum(final)

    assert no_races(mosaic_ssd.ssd_mosaic(x, dt, A, B, C, reset, h0, chunk_size=64, spans=1, interpret=params))
    assert no_races(jax.vjp(ssd_loss, x, dt, B, C)[0])  # the forward that saves the states
    assert no_races(jax.grad(ssd_loss, argnums=range(4))(x, dt, B, C))  # its last kernel: the gradients


def factor_inputs(seed, b, h, n, dk, dtype, correlated):
    """k [b, n*C, h, dk] (unit rows; `correlated` mixes a shared direction into the keys, which makes T's entries
    large), beta, G and segment indices in the chunk layout of `gated_delta.chunk_inverse`, chunks of 64."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((b, n * 64, h, dk))
    k = (1 - correlated) * k + 3 * correlated * rng.standard_normal((b, 1, h, dk))
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    beta = 1 / (1 + np.exp(-rng.standard_normal((b, h, n, 64))))
    cum = np.cumsum(-0.05 * np.logaddexp(0.0, rng.standard_normal((b, h, n, 64))), axis=-1)
    seg = np.cumsum(rng.random((b, 1, n, 64)) < 0.03, axis=-1)
    return jnp.asarray(k, dtype), jnp.asarray(beta, F32), jnp.asarray(cum, F32), jnp.asarray(seg, jnp.int32)


@pytest.mark.parametrize("dtype, correlated, per_cta, segmented", [
    (F32, 0.0, 1, True), (F32, 0.9, 4, False), (jnp.bfloat16, 0.0, 4, True), (jnp.bfloat16, 0.9, 1, False)])
def test_gdn_chunk_factor_kernel_matches_xla(dtype, correlated, per_cta, segmented):
    """The kernel's T = (I + M)^{-1} against `gated_delta.chunk_inverse` on the same (rounded) k: 1e-6 from fp32
    operands; from bf16 ones T and Ag = T diag(beta) (in k's dtype) within 1e-2, ~2.5 bf16 roundoffs (each of the
    doublings' products rounds its fp32 factors to bf16 once: measured 1.4e-3 and 4.9e-3 here); one chunk a CTA
    or all four (keys prefetched into two slots, each used twice); with resets or with no segment index. The bf16
    kernel is lowered for CUDA too."""
    args = factor_inputs(0, 1, 2, 4, 64, dtype, correlated)
    args = args if segmented else (*args[:3], None)
    if dtype == jnp.bfloat16:
        lowered = jax.jit(functools.partial(mosaic_gdn_factors.chunk_factor, chunks_per_cta=per_cta)).trace(
            *args).lower(lowering_platforms=("cuda",))
        assert lowered.as_text().count("custom_call @mosaic_gpu") == 1
    run = functools.partial(mosaic_gdn_factors.chunk_factor, chunks_per_cta=per_cta,
                            interpret=mosaic_common.interpret_params())
    ag, t = run(*args, save_t=True)
    (ag_alone,) = run(*args)
    t_ref = chunk_inverse(_in_chunks(args[0].astype(F32), 64), *args[1:])
    assert t.dtype == F32 and ag.dtype == ag_alone.dtype == dtype
    tolerance = 1e-2 if dtype == jnp.bfloat16 else 1e-6
    assert rel_err(t, t_ref) < tolerance
    assert rel_err(ag.astype(F32), t_ref * args[1][..., None, :]) < tolerance
    assert jnp.array_equal(ag, ag_alone)


def test_kernels_lower_in_lane_semantics_unless_told(monkeypatch):
    """Lane semantics by default (jax 0.11's warpgroup layout inference fails the factor kernel);
    HYLO_MOSAIC_SEMANTICS picks the other, and a wrong name is refused."""
    monkeypatch.delenv("HYLO_MOSAIC_SEMANTICS", raising=False)
    assert mosaic_common.compiler_params().lowering_semantics == plgpu.LoweringSemantics.Lane
    monkeypatch.setenv("HYLO_MOSAIC_SEMANTICS", "warpgroup")
    assert mosaic_common.compiler_params().lowering_semantics == plgpu.LoweringSemantics.Warpgroup
    monkeypatch.setenv("HYLO_MOSAIC_SEMANTICS", "warp")
    with pytest.raises(ValueError, match="HYLO_MOSAIC_SEMANTICS must be one of"):
        mosaic_common.compiler_params()


@pytest.mark.parametrize("given_state, segmented", [(True, True), (False, False)])
def test_gdn_mosaic_path_gradients_match_chunked(given_state, segmented):
    """The whole op on the Mosaic kernels (factor, forward, reverse and the three gradient passes): output, final
    state and every input cotangent = chunked (fp32), from a given initial state or none (the passes start from
    zeros they neither receive nor load), with packed segments or with none (no index formed). Under a mesh the
    kernels run per device in a shard_map; that is traced here, not run: the GPU interpreter hangs when several CPU
    devices run it at once."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from hylo_jax.config import MeshConfig
    from hylo_jax.sharding import make_mesh

    rng = np.random.default_rng(8)
    b, t, h, d = 2, 100, 1, 64  # two chunks, the second short
    q, k, v, s0 = (jnp.asarray(rng.standard_normal(s), F32) for s in [(b, t, h, d)] * 3 + [(b, h, d, d)])
    g = jnp.asarray(-np.logaddexp(0.0, rng.standard_normal((b, t, h))), F32)
    beta = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((b, t, h)))), F32)
    seg = jnp.asarray(np.cumsum(rng.random((b, t)) < 0.03, axis=1), jnp.int32)
    do, ds = jnp.asarray(rng.standard_normal((b, t, h, d)), F32), jnp.asarray(rng.standard_normal(s0.shape), F32)

    def loss(impl):
        def f(q, k, v, g, beta, s0=None):
            o, final = gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=seg if segmented else None,
                                        use_qk_l2norm=True, impl=impl)
            return jnp.sum(o * do) + jnp.sum(final * ds)
        return jax.grad(f, argnums=range(5 + given_state))

    args = (q, k, v, g, beta, s0)[:5 + given_state]
    want = loss("chunked")(*args)
    with pallas_common.force_backend("mosaic_gpu", mosaic_common.interpret_params()):
        got = loss("pallas")(*args)
        mesh = make_mesh(MeshConfig(data=2), devices=jax.devices()[:2])
        with jax.set_mesh(mesh):
            sharded = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in args]
            assert str(jax.make_jaxpr(loss("pallas"))(*sharded)).count("shard_map") >= 3
    for name, a, w in zip(("q", "k", "v", "g", "beta", "initial_state")[:len(args)], got, want, strict=True):
        assert rel_err(a, w) < 1e-5, name


@pytest.mark.slow  # ~40 s on the CI machine; the device check (`kernels.py --check`) runs the same in bf16
def test_gdn_mosaic_forward_in_bf16_is_close_to_chunked():
    """The forward alone (the chunk inverse, then the fused forward) from bf16 q, k, v: bf16-level
    agreement with the fp32 chunked path."""
    rng = np.random.default_rng(9)
    b, t, h, dk, dv = 1, 150, 2, 64, 128
    q, k = (jnp.asarray(rng.standard_normal((b, t, h, dk)), jnp.bfloat16) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.bfloat16)
    g = jnp.asarray(-np.logaddexp(0.0, rng.standard_normal((b, t, h))), F32)
    beta = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((b, t, h)))), F32)
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), F32)
    with pallas_common.force_backend("mosaic_gpu", mosaic_common.interpret_params()):
        o, final = gated_delta_rule(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True, impl="pallas")
    o_ref, final_ref = gated_delta_rule(*(x.astype(F32) for x in (q, k, v)), g, beta, initial_state=s0,
                                        use_qk_l2norm=True, impl="chunked")
    assert o.dtype == jnp.bfloat16
    assert rel_err(o.astype(F32), o_ref) < 2e-2 and rel_err(final, final_ref) < 2e-2


@pytest.mark.parametrize("cores, vb", [(16, 64), pytest.param(132, 32, marks=pytest.mark.slow)])
def test_gdn_mosaic_path_lowers_for_cuda_at_hylo_sizes(monkeypatch, cores, vb):
    """d_k 256, d_v 512, chunks of 64, bf16: under jax.grad the chunk-factor kernel, the forward saving states,
    the reverse pass and the three gradient passes, without it the factors and the forward alone, pass the Mosaic GPU
    lowering (shared memory, layouts, wgmma operands); the passes take value blocks of 64 columns where the grid
    (2 x 8 CTAs) fills the GPU, else 32."""
    monkeypatch.setattr(pallas_common, "gpu_cores", lambda: cores)
    assert mosaic_gdn.value_block(2, 512, cores) == vb
    rng = np.random.default_rng(1)
    b, t, h, dk, dv = 1, 256, 2, 256, 512
    q, k = (jnp.asarray(rng.standard_normal((b, t, h, dk)), jnp.bfloat16) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, t, h, dv)), jnp.bfloat16)
    g, beta = jnp.full((b, t, h), -0.1, F32), jnp.full((b, t, h), 0.5, F32)

    def loss(q, k, v, g, beta):
        o, final = gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True, impl="pallas")
        return jnp.sum(o.astype(F32)) + jnp.sum(final)

    def kernel_calls(fn):
        with pallas_common.force_backend("mosaic_gpu", None):
            lowered = jax.jit(fn).trace(q, k, v, g, beta).lower(lowering_platforms=("cuda",))
        return lowered.as_text().count("custom_call @mosaic_gpu")

    assert kernel_calls(jax.grad(jax.checkpoint(loss), argnums=range(5))) == 6  # composes with remat
    assert kernel_calls(loss) == 2


# ----------------------------------------------------------------------------- dispatch
@pytest.mark.slow  # ~50 s: the dispatch of `impl="pallas"` to the Mosaic kernels, which the whole-op tests run
def test_mosaic_kernels_serve_impl_pallas_when_chosen(monkeypatch):
    """On a Hopper GPU the Mosaic kernels are the Pallas path of the ops in `MOSAIC_FIRST_ON_HOPPER` (Triton where they
    do not take the shape), else opt-in; elsewhere Triton; `gpu_kernels` (or HYLO_GPU_KERNELS) picks one. The whole
    ops then match the chunked path (fp32 operands in the interpreter)."""
    ok, why = pallas_common.gpu_capability_ok("mosaic_gpu")
    assert not ok and "not 9.x" in why  # the CPU; an sm100 GPU too (no wgmma)
    monkeypatch.setattr(pallas_common, "platform", lambda: "gpu")
    monkeypatch.setattr(pallas_common, "gpu_capability_ok", lambda driver="gpu": (True, ""))

    def refused_by(*drivers):  # an op's `unsupported(driver)`: these drivers refuse its shape
        return lambda driver: f"{driver} refuses the shape" if driver in drivers else None

    takes_all, not_mosaic, neither = refused_by(), refused_by("mosaic_gpu"), refused_by("mosaic_gpu", "gpu")
    assert pallas_common.choose("ssd", "auto", takes_all)[:2] == ("pallas", "gpu")  # the CPU is no Hopper
    monkeypatch.setattr(pallas_common, "is_hopper", lambda: True)
    assert pallas_common.choose("gated_delta_rule", "auto", takes_all)[:2] == ("pallas", "mosaic_gpu")
    assert pallas_common.choose("ssd", "auto", takes_all)[:2] == ("pallas", "mosaic_gpu")
    assert pallas_common.choose("ssd", "auto", not_mosaic)[:2] == ("pallas", "gpu")
    assert pallas_common.choose("ssd", "pallas", not_mosaic)[:2] == ("pallas", "gpu")
    assert pallas_common.choose("ssd", "auto", neither)[:2] == ("chunked", None)
    with pallas_common.gpu_kernels("triton"):
        assert pallas_common.choose("ssd", "auto", takes_all)[:2] == ("pallas", "gpu")
    monkeypatch.setattr(pallas_common, "is_hopper", lambda: False)
    with pallas_common.gpu_kernels("mosaic"):
        assert pallas_common.choose("ssd", "auto", takes_all)[:2] == ("pallas", "mosaic_gpu")
        assert pallas_common.choose("ssd", "auto", not_mosaic)[:2] == ("chunked", None)
    monkeypatch.setenv("HYLO_GPU_KERNELS", "mosaic")
    assert pallas_common.choose("ssd", "pallas", takes_all)[:2] == ("pallas", "mosaic_gpu")
    monkeypatch.setenv("HYLO_GPU_KERNELS", "cuda")
    with pytest.raises(ValueError, match="HYLO_GPU_KERNELS"):
        pallas_common.choose("ssd", "auto", lambda be: None)
    monkeypatch.undo()

    rng = np.random.default_rng(5)
    t = 70  # two chunks, the second short
    q, k, v = (jnp.asarray(rng.standard_normal((1, t, 1, 64)), F32) for _ in range(3))
    g = jnp.asarray(-np.logaddexp(0.0, rng.standard_normal((1, t, 1))), F32)
    beta = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((1, t, 1)))), F32)
    seg = jnp.asarray(np.cumsum(rng.random((1, t)) < 0.03, axis=1), jnp.int32)
    with pallas_common.force_backend("mosaic_gpu", mosaic_common.interpret_params()):
        o, s = gated_delta_rule(q, k, v, g, beta, segment_ids=seg, use_qk_l2norm=True, impl="pallas")
        x, dt, A, B, C, reset, h0 = ssd_inputs(6, 1, t, 1, 1, 64, 64, F32)
        y, final = ssd(x, dt, A, B, C, initial_state=h0, chunk_size=64, impl="pallas")
    o_ref, s_ref = gated_delta_rule(q, k, v, g, beta, segment_ids=seg, use_qk_l2norm=True, impl="chunked")
    y_ref, final_ref = ssd(x, dt, A, B, C, initial_state=h0, chunk_size=64, impl="chunked")
    for got, want in ((o, o_ref), (s, s_ref), (y, y_ref), (final, final_ref)):
        assert rel_err(got, want) < 1e-5
