"""Building blocks shared by the recurrent mixers (Mamba2, Gated DeltaNet): the short causal
depthwise convolution and the initialisers of the decay (A_log) and time step (dt_bias)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from hylo_jax.parallel import context

_F32 = jnp.float32


def init_dt_bias(key: jax.Array, heads: int, dt_min: float, dt_max: float, floor: float,
                 dtype) -> jax.Array:
    """softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], floored (Mamba2 / fla init)."""
    log_dt = jax.random.uniform(key, (heads,), _F32, math.log(dt_min), math.log(dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def init_a_log(key: jax.Array, heads: int, lo: float, hi: float, dtype) -> jax.Array:
    """log(A) with A uniform in [lo, hi) (A = 0 draws are clamped to the smallest normal)."""
    a = jax.random.uniform(key, (heads,), _F32, lo, hi)
    return jnp.log(jnp.maximum(a, jnp.finfo(_F32).tiny)).astype(dtype)


def padded_lengths(positions: Int[Array, "b t"] | None, kv_length: Int[Array, "b"] | None
                   ) -> Int[Array, "b"] | None:
    """Real tokens of each right-padded row in a cached call: those at positions < kv_length."""
    if positions is None or kv_length is None:
        return None
    return jnp.clip(kv_length - positions[:, 0], 0, positions.shape[1]).astype(jnp.int32)


def _continuing_ids(segment_ids: Int[Array, "b t"], k: int) -> Int[Array, "b k+t"]:
    """Segment ids with k leading slots for cached inputs, which belong to the first document."""
    return jnp.concatenate([jnp.repeat(segment_ids[:, :1], k, axis=1), segment_ids], axis=1)


class CausalConv1d(nnx.Module):
    """Depthwise causal convolution: y_t[c] = bias[c] + sum_k kernel[k, c] u_{t-K+1+k}[c] (fp32).

    Inputs from before the sequence come from `prefix` (the previous K-1 inputs); with segment
    ids an input counts only if it belongs to token t's document. `kernel` is [K, channels]
    (PyTorch's Conv1d `weight` [channels, 1, K] transposed).
    """

    def __init__(self, channels: int, kernel_size: int, *, use_bias: bool, rngs: nnx.Rngs,
                 param_dtype=jnp.float32, channel_axis: str | None = None):
        bound = kernel_size ** -0.5  # PyTorch's Conv1d init: fan_in = kernel_size
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (kernel_size, channels),
                                                   param_dtype, -bound, bound),
                                logical_axes=(None, channel_axis))
        self.bias = (nnx.Param(jax.random.uniform(rngs.params(), (channels,), param_dtype,
                                                  -bound, bound), logical_axes=(channel_axis,))
                     if use_bias else None)

    def __call__(self, u: Float[Array, "b t c"], prefix: Float[Array, "b k c"],
                 segment_ids: Int[Array, "b t"] | None = None, lengths: Int[Array, "b"] | None = None
                 ) -> tuple[Float[Array, "b t c"], Float[Array, "b k c"]]:
        """Returns (y in fp32, the last K-1 inputs: the next call's prefix). Prefix rows of an
        earlier document than the last token's are zeroed, so decoding continues it exactly. With
        `lengths` (a cached call on right-padded rows) only each row's first `lengths` tokens are real:
        the prefix is the K-1 inputs before token `lengths`. On a mesh with a `sequence` axis > 1 the
        shards exchange their last K-1 inputs (`parallel.context.causal_conv1d`)."""
        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        if context.active_mesh() is None or lengths is not None:
            return causal_conv1d(u, prefix, kernel, bias, segment_ids, lengths)
        y = context.causal_conv1d(causal_conv1d, u, prefix, kernel, bias, segment_ids)
        return y, _last_inputs(u, prefix, segment_ids)


def _last_inputs(u, prefix, segment_ids):
    """The last K-1 inputs (the prefix of the next call), rows of an earlier document zeroed."""
    k = prefix.shape[1]
    window = jnp.concatenate([prefix.astype(u.dtype), u], axis=1)[:, -k:] if k else prefix
    if segment_ids is None or not k:
        return window
    ids = _continuing_ids(segment_ids, k)[:, -k:]
    return jnp.where((ids == segment_ids[:, -1:])[..., None], window, 0)


def causal_conv1d(u: Float[Array, "b t c"], prefix: Float[Array, "b k c"], kernel: Float[Array, "K c"],
                  bias: Float[Array, " c"] | None, segment_ids: Int[Array, "b t"] | None = None,
                  lengths: Int[Array, "b"] | None = None) -> tuple[Float[Array, "b t c"], Float[Array, "b k c"]]:
    """`CausalConv1d` as a function of its parameters: (y in fp32, the next prefix)."""
    if lengths is not None and segment_ids is not None:
        raise ValueError("causal_conv1d takes segment ids (packed rows) or lengths (padded rows), not both")
    t, k = u.shape[1], prefix.shape[1]
    window = jnp.concatenate([prefix.astype(u.dtype), u], axis=1)  # [b, k + t, c]
    kernel = kernel.astype(_F32)
    y = jnp.zeros(u.shape, _F32) if bias is None else jnp.broadcast_to(bias.astype(_F32), u.shape)
    ids = None if segment_ids is None else _continuing_ids(segment_ids, k)
    for j in range(k + 1):
        tap = window[:, j:j + t].astype(_F32)
        if ids is not None:
            tap = jnp.where((ids[:, j:j + t] == segment_ids)[..., None], tap, 0.0)
        y = y + kernel[j] * tap
    if lengths is None:
        new_prefix = window[:, t:]
    else:
        new_prefix = jax.vmap(lambda w, n: jax.lax.dynamic_slice_in_dim(w, n, k, axis=0))(window, lengths)
    if ids is not None:
        new_prefix = jnp.where((ids[:, t:] == segment_ids[:, -1:])[..., None], new_prefix, 0)
    return y, new_prefix
