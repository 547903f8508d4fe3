"""The flash-decode kernel over MLA latents (Pallas interpret mode on CPU) against dense softmax attention."""

import jax.numpy as jnp
import numpy as np
import pytest

from hylo_jax.kernels import flash_decode


def dense(q, latent, limit, rank, scale):
    """float64 numpy: softmax over slots j < limit of scale q . latent_j, times c_j."""
    q, latent = np.asarray(q, np.float64), np.asarray(latent, np.float64)
    out = np.zeros((*q.shape[:2], rank))
    for row, n in enumerate(np.asarray(limit)):
        if n == 0:
            continue
        scores = scale * q[row] @ latent[row, :n].T
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out[row] = (p / p.sum(-1, keepdims=True)) @ latent[row, :n, :rank]
    return out


@pytest.mark.parametrize("limits", [[512, 300, 1], [0, 65, 257]], ids=["full-partial-one", "empty-row"])
def test_matches_dense_attention(limits):
    b, h, rank, rope, slots = 3, 16, 32, 16, 512
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, h, rank + rope)), jnp.float32)
    latent = jnp.asarray(rng.standard_normal((b, slots, rank + rope)), jnp.float32)
    limit = jnp.asarray(limits, jnp.int32)
    tiling = flash_decode.DecodeTiling(block=64, programs=512)
    assert flash_decode.split_size(b, slots, tiling) == 256  # two splits: rows end in, at and before a split
    got = flash_decode.latent_decode_attention(q, latent, limit, rank=rank, scale=0.1, interpret=True,
                                               tiling=tiling)
    want = dense(q, latent, limit, rank, 0.1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_unsupported_shapes_are_refused():
    assert "heads=12" in flash_decode.unsupported(12, 32, 16, 512)
    assert "not a multiple of 16" in flash_decode.unsupported(16, 32, 16, 100)
    assert flash_decode.DecodeTiling(block=128).fit(96).block == 32
    with pytest.raises(ValueError, match="kv_lora_rank=48"):
        flash_decode.latent_decode_attention(jnp.zeros((1, 16, 64)), jnp.zeros((1, 64, 64)),
                                             jnp.ones((1,), jnp.int32), rank=48, scale=1.0, interpret=True)


def test_runs_per_device_under_a_mesh():
    """Under a set data x fsdp mesh the kernel runs per device over batch rows: same result, batch-sharded."""
    import jax

    from hylo_jax.config import MeshConfig
    from hylo_jax.sharding import make_mesh

    b, h, rank, rope, slots = 4, 16, 32, 16, 256
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((b, h, rank + rope)), jnp.float32)
    latent = jnp.asarray(rng.standard_normal((b, slots, rank + rope)), jnp.float32)
    limit = jnp.asarray([256, 10, 100, 1], jnp.int32)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    f = jax.jit(lambda q, x, n: flash_decode.latent_decode_attention(q, x, n, rank=rank, scale=0.1, interpret=True))
    with jax.set_mesh(mesh):
        got = f(q, latent, limit)
    assert got.sharding.spec[0] == ("data", "fsdp"), got.sharding
    np.testing.assert_allclose(np.asarray(got), dense(q, latent, limit, rank, 0.1), rtol=1e-5, atol=1e-5)
