"""The flash block-attention kernel (interpret mode) against dense attention in float64-free fp32 JAX:
output, log-sum-exp and the VJP for cotangents of both, with GQA, a head dim split in power-of-two parts,
zig-zag (non-contiguous) global positions, packed segments and rows that see no key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hylo_jax.kernels.flash_block import NEG, block_rows, dim_parts, flash_block, unsupported


def dense(q, k, v, qpos, kpos, qseg, kseg, scale):
    """(o, lse) of masked attention, written out in full; rows that see nothing give (0, NEG)."""
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") * scale
    ok = (kpos[None, :] <= qpos[:, None])[None, None] & (qseg[:, None, :, None] == kseg[:, None, None, :])
    seen = ok.any(-1)
    lse = jax.nn.logsumexp(jnp.where(ok, s, NEG), axis=-1)
    p = jnp.where(ok, jnp.exp(jnp.where(ok, s - lse[..., None], 0.0)), 0.0)
    o = jnp.einsum("bhqk,bkhv->bqhv", p, v, precision="highest")
    return o, jnp.where(seen, lse, NEG)


def _case(rng, b=2, tq=32, tk=48, h=4, g=2, d=48, dv=16):
    q, k = rng.standard_normal((b, tq, h, d)), rng.standard_normal((b, tk, g, d))
    v = rng.standard_normal((b, tk, g, dv))
    qpos = np.concatenate([np.arange(16, 32), np.arange(80, 96)])  # two zig-zag halves
    kpos = np.concatenate([np.arange(0, 16), np.arange(40, 72)])
    qseg = np.repeat([[1, 2]], b, 0).repeat(tq // 2, 1)
    kseg = np.where(kpos < 12, 0, np.where(kpos < 60, 1, 2))[None].repeat(b, 0)
    kseg[1, :5] = 1
    qseg[:, :4] = 3  # a document with no key in this block
    arrays = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
    return arrays + [jnp.asarray(x, jnp.int32) for x in (qpos, kpos, qseg, kseg)]


def test_dim_parts_and_limits():
    assert dim_parts(192) == ((0, 128), (128, 64))
    assert dim_parts(64) == ((0, 64),)
    assert unsupported(64, 64, 192, 128) is None
    assert "value head dim" in unsupported(64, 64, 64, 96)
    assert "multiples" in unsupported(100, 64, 64, 64)
    assert block_rows(96) == 32 and block_rows(4096) == 64 and block_rows(24) == 0
    assert "part below" in unsupported(64, 64, 72, 64)


@pytest.mark.parametrize("shape", [dict(), dict(h=2, g=2, d=32, dv=32)])
def test_forward_and_vjp_match_dense(shape):
    rng = np.random.default_rng(0)
    args = _case(rng, **shape)
    scale = args[0].shape[-1] ** -0.5
    ours = lambda q, k, v: flash_block(q, k, v, *args[3:], scale=scale, interpret=True)  # noqa: E731
    ref = lambda q, k, v: dense(q, k, v, *args[3:], scale)  # noqa: E731
    (o, lse), vjp = jax.vjp(ours, *args[:3])
    (o_ref, lse_ref), vjp_ref = jax.vjp(ref, *args[:3])
    assert bool((lse == NEG).any()), "the case should have rows that see no key"
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)
    cot = (jnp.asarray(rng.standard_normal(o.shape), jnp.float32),
           jnp.asarray(rng.standard_normal(lse.shape), jnp.float32))
    for name, got, want in zip("qkv", vjp(cot), vjp_ref(cot)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5, err_msg=f"d{name}")


def test_merged_blocks_equal_one_attention():
    """Two key blocks merged by log-sum-exp (as context parallelism does) = attention over both; gradients too."""
    rng = np.random.default_rng(1)
    q, k, v, qpos, kpos, qseg, kseg = _case(rng)
    scale = 0.3

    def merged(q, k, v):
        halves = [slice(0, 16), slice(16, 48)]
        outs = [flash_block(q, k[:, s], v[:, s], qpos, kpos[s], qseg, kseg[:, s], scale=scale, interpret=True)
                for s in halves]
        lse = jnp.logaddexp(outs[0][1], outs[1][1])
        w = [jnp.exp(x[1] - lse).transpose(0, 2, 1)[..., None] for x in outs]
        return w[0] * outs[0][0] + w[1] * outs[1][0]

    whole = lambda q, k, v: dense(q, k, v, qpos, kpos, qseg, kseg, scale)[0]  # noqa: E731
    o, vjp = jax.vjp(merged, q, k, v)
    o_ref, vjp_ref = jax.vjp(whole, q, k, v)
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
    do = jnp.asarray(rng.standard_normal(o.shape), jnp.float32)
    for got, want in zip(vjp(do), vjp_ref(do)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


def test_bf16_inputs_close_to_fp32():
    rng = np.random.default_rng(2)
    args = _case(rng)
    scale = 0.2
    lo = [a.astype(jnp.bfloat16) for a in args[:3]]
    o, lse = flash_block(*lo, *args[3:], scale=scale, interpret=True)
    o_ref, lse_ref = dense(*[a.astype(jnp.float32) for a in lo], *args[3:], scale)
    assert o.dtype == jnp.float32
    np.testing.assert_allclose(o, o_ref, atol=3e-2)
    np.testing.assert_allclose(lse, lse_ref, atol=3e-2)


def test_bad_shapes_raise():
    rng = np.random.default_rng(3)
    q, k, v, *rest = _case(rng)
    with pytest.raises(ValueError, match="do not match"):
        flash_block(q, k[:, :, :1, :32], v, *rest, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="multiples"):
        flash_block(q[:, :24], k, v, rest[0][:24], *rest[1:], scale=1.0, interpret=True)
