"""The attention dispatch: XLA vs a naive softmax, splash (TPU kernel, interpret mode), cache path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from hylo_jax.kernels import attention as attention_module
from hylo_jax.kernels.attention import attention, cached_attention, count_segments, segment_layout


def qkv(b=2, t=37, h=4, hk=2, d=16, dv=16, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], (b, t, h, d)), jax.random.normal(k[1], (b, t, hk, d)),
            jax.random.normal(k[2], (b, t, hk, dv)))


def naive(q, k, v, segment_ids=None):
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    t = q.shape[1]
    mask = np.tril(np.ones((t, t), bool))[None, None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    s = np.where(mask, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def test_xla_matches_naive_with_segments_and_smaller_value_dim():
    q, k, v = qkv(dv=8)
    seg = np.repeat(np.array([[0] * 10 + [1] * 20 + [2] * 7]), 2, 0)
    out = attention(q, k, v, segment_ids=jnp.asarray(seg), impl="xla")
    assert out.shape == (2, 37, 4, 8)
    assert rel_err(out, naive(*map(np.asarray, (q, k, v)), seg)) <= 1e-5


def test_splash_tpu_kernel_in_interpret_mode_matches_xla():
    q, k, v = qkv(t=256, d=128, dv=128)
    seg = jnp.asarray(np.repeat(np.array([[0] * 100 + [1] * 156]), 2, 0))
    want = attention(q, k, v, segment_ids=seg, impl="xla")
    got = attention(q, k, v, segment_ids=seg, impl="splash", interpret=True)
    assert rel_err(got, want) <= 1e-5
    grad = lambda impl: jax.grad(  # noqa: E731
        lambda q, k, v: jnp.sum(attention(q, k, v, segment_ids=seg, impl=impl, interpret=True) ** 2),
        argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(grad("splash"), grad("xla")):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("block, scores_bytes", [(4, 1), (4, 8 * 512), (1024, 1 << 28)],
                         ids=["5-steps-of-4", "steps-of-8-last-overlapping", "one-step"])
def test_cached_attention_equals_causal_attention(monkeypatch, block, scores_bytes):
    """Blocked online softmax over a full 20-slot cache = causal attention. One step's scores take
    b * groups * heads per group * queries * 4 = 512 bytes per key, so the cases visit the cache in
    5 steps of 4 slots; in steps of 8 whose third one starts at slot 12 and must skip slots 12-15,
    already seen; in one step. A row with a shorter kv_length ignores the slots past it."""
    monkeypatch.setattr(attention_module, "CACHE_BLOCK", block)
    monkeypatch.setattr(attention_module, "SCORES_BYTES", scores_bytes)
    q, k, v = qkv(b=2, t=20)
    full = attention(q, k, v, impl="xla")
    short = attention(q[1:, :7], k[1:, :7], v[1:, :7], impl="xla")
    assert attention_module.cache_slots(20) == 20
    pos = jnp.broadcast_to(jnp.arange(4, 20), (2, 16))
    grouped = q[:, 4:].reshape(2, 16, 2, 2, 16)
    out = cached_attention(grouped, k, v, q_positions=pos, kv_length=jnp.array([20, 7])).reshape(2, 16, 4, 16)
    assert rel_err(out[0], full[0, 4:]) <= 1e-5
    assert rel_err(out[1, :3], short[0, 4:7]) <= 1e-5  # queries past kv_length see only its slots


def test_bad_shapes_and_impl():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="impl 'flash'"):
        attention(q, k, v, impl="flash")
    with pytest.raises(ValueError, match="not a multiple of key/value heads"):
        attention(q[:, :, :3], k, v, impl="xla")
    with pytest.raises(ValueError, match="do not match"):
        attention(q, k[:, :5], v, impl="xla")


@pytest.mark.parametrize("starts,length", [((48, 20), (64, 36)), ((64, 40), (80, 56)), ((64, 56), (80, 72))])
def test_cached_attention_flash_kernel_equals_xla(monkeypatch, starts, length):
    """The flash kernel path (interpret mode) = the XLA online softmax on an 80-slot cache (blocks of 16,
    steps of 32 slots), with rows at different positions and kv_lengths, grouped heads and MLA-style
    expanded values (a slice of each key). Slots 0-15 / 0-31 / 0-47 lie before every query and kv_length
    and take the unmasked kernel (in the first and third cases its first step clamps at slot 0 and
    attends only 16 slots); the rest take the masked kernel (in the second case its last step clamps at
    the cache's end, starts at slot 48 and must skip slots 48-63)."""
    monkeypatch.setattr(attention_module, "CACHE_BLOCK", 16)
    b, s, g, qh, d, dv = 2, 80, 2, 2, 32, 16
    monkeypatch.setattr(attention_module, "EXPANDED_BYTES", b * g * (d + dv) * 4 * 32)
    keys = jax.random.normal(jax.random.key(1), (b, s, g, d))
    q = jax.random.normal(jax.random.key(2), (b, 16, g, qh, d))
    pos = jnp.stack([jnp.arange(start, start + 16) for start in starts])
    length = jnp.array(length)
    expand = lambda k, v: (k, v[..., :dv])  # noqa: E731
    got = cached_attention(q, keys, keys, q_positions=pos, kv_length=length, expand=expand, impl="pallas")
    want = cached_attention(q, keys, keys, q_positions=pos, kv_length=length, expand=expand, impl="xla")
    assert got.shape == (b, 16, g, qh, dv)
    assert rel_err(got, want) <= 1e-5


def test_cached_attention_flash_kernel_per_device_on_a_mesh():
    """Under a data x tensor mesh the kernel path runs per device over rows and KV heads: same result."""
    from hylo_jax.config import MeshConfig
    from hylo_jax.sharding import make_mesh

    b, s, g, qh, d = 2, 32, 2, 2, 16
    keys, values = (jax.random.normal(jax.random.key(i), (b, s, g, d)) for i in (1, 2))
    q = jax.random.normal(jax.random.key(3), (b, 16, g, qh, d))
    pos, length = jnp.broadcast_to(jnp.arange(16, 32), (b, 16)), jnp.array([32, 20])
    f = jax.jit(lambda *a: cached_attention(*a, q_positions=pos, kv_length=length, impl="pallas"))
    want = f(q, keys, values)
    with jax.set_mesh(make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])):
        got = f(q, keys, values)
    assert rel_err(got, want) <= 1e-6


def test_segment_layout_of_packed_rows():
    """Runs of equal ids -> cuDNN's (lengths [b, M], offsets [b, M + 1]), unused entries -1."""
    ids = jnp.array([[1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 2, 3, 4, 4, 4, 0]])
    lengths, offsets, runs = segment_layout(ids, 5)
    np.testing.assert_array_equal(lengths, [[2, 3, 2, -1, -1], [7, -1, -1, -1, -1], [1, 1, 1, 3, 1]])
    np.testing.assert_array_equal(offsets, [[0, 2, 5, -1, -1, -1], [0, -1, -1, -1, -1, -1], [0, 1, 2, 3, 6, -1]])
    np.testing.assert_array_equal(runs, [3, 1, 5])
    assert count_segments(np.asarray(ids)) == 5
