"""The Mosaic GPU (Hopper) SSD kernels, forward and backward, on CPU: in the GPU interpreter against the
sequential reference (outputs) and the chunked path (every input cotangent), and lowered for CUDA (the Mosaic
GPU lowering checks layouts, wgmma operands, transfers and shared memory in Python).

Tolerances (max |a - b| / max |b|): fp32 operands 1e-5 (the interpreter multiplies exactly, so this checks the
algorithm: masks, segments, states, padding, groups, spans, the slots of the pipeline); bf16 operands 2e-2
(matmul operands are rounded to bf16 before their wgmmas, as on the device).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hylo_jax.kernels import mosaic_ssd
from hylo_jax.kernels.ssd import _ssd_chunked, _ssd_reference

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
    (1, 450, 2, 1, 64, 64, 64, 2, 3),
    (1, 300, 2, 1, 64, 128, 64, 3, 2),
    (1, 260, 2, 2, 64, 64, 128, 2, None),
    (1, 150, 2, 1, 128, 64, 64, 2, 2),
]
# the backward in the interpreter takes 5-15 s a case: the default suite runs the first two (groups, resets,
# spans), the slow job all
GRAD_CASES = CASES[:2] + [pytest.param(*c, marks=pytest.mark.slow) for c in CASES[2:]]


@pytest.mark.parametrize("b, t, h, g, p, n, chunk, stages, spans", CASES)
@pytest.mark.parametrize("dtype, tol", [(F32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_forward_matches_the_sequential_reference(b, t, h, g, p, n, chunk, stages, spans, dtype, tol):
    x, dt, A, B, C, reset, h0 = ssd_inputs(0, b, t, h, g, p, n, dtype)
    y, final = mosaic_ssd.ssd_mosaic(x, dt, A, B, C, reset, h0, chunk, stages=stages, spans=spans,
                                     interpret=mosaic_ssd.interpret_params())
    y_ref, final_ref = _ssd_reference(x.astype(F32), dt, A, B.astype(F32), C.astype(F32), reset, h0, chunk)
    assert y.dtype == dtype and final.dtype == F32
    assert rel_err(y.astype(F32), y_ref) < tol
    assert rel_err(final, final_ref) < tol


def loss_of(ssd_fn, dy, dfinal):
    def loss(x, dt, A, B, C, reset, h0):
        y, final = ssd_fn(x, dt, A, B, C, reset, h0)
        return jnp.sum(y.astype(F32) * dy) + jnp.sum(final * dfinal)
    return loss


@pytest.mark.parametrize("b, t, h, g, p, n, chunk, stages, spans", GRAD_CASES)
@pytest.mark.parametrize("dtype, tol", [(F32, 2e-5), (jnp.bfloat16, 2e-2)])
def test_gradients_match_the_chunked_path(b, t, h, g, p, n, chunk, stages, spans, dtype, tol):
    args = ssd_inputs(3, b, t, h, g, p, n, dtype)
    rng = np.random.default_rng(4)
    dy, dfinal = (jnp.asarray(rng.standard_normal(s), F32) for s in ((b, t, h, p), (b, h, p, n)))
    ours = functools.partial(mosaic_ssd.ssd_mosaic, chunk_size=chunk, stages=stages, spans=spans,
                             interpret=mosaic_ssd.interpret_params())

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
    (128, 128, 64, jnp.bfloat16, "shared memory"),
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
