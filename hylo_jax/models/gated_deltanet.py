"""Gated DeltaNet mixer (Yang et al., ICLR 2025) as a Flax NNX module, fla / HyLo layout.

For input x [b, t, d], H heads, key width dk and value width dv = expand_v * dk:

    q, k, v = silu(conv_q(x W_q)), silu(conv_k(x W_k)), silu(conv_v(x W_v))   causal depthwise convs, width K
    beta_t  = sigmoid(x_t W_b)                                            [H], step size of the delta rule
    g_t     = -exp(A_log) * softplus(x_t W_a + dt_bias)                   [H], log-decay <= 0
    o       = gated_delta_rule(l2norm(q), l2norm(k), v, g, beta)          see `kernels.gated_delta`
    y       = (RMSNorm(o_h) * o_norm.scale * silu(x W_g)_h) W_o            per-head norm, then output gate

Projections are separate (not fused as in Qwen3-Next's `in_proj_qkvz`) so that upcycling can copy an attention
layer's q/k/v/o_proj into q/k/v/o_proj. Parameter names: `q_proj`, `k_proj`, `v_proj`, `a_proj`, `b_proj`,
`g_proj` (Linear, kernel [d, out]), `q_conv1d`, `k_conv1d`, `v_conv1d` (kernel [K, channels]; PyTorch Conv1d
`weight` [channels, 1, K] transposed), `A_log`, `dt_bias` [H], `o_norm.scale` [dv], `o_proj` (kernel [H dv, d]).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jaxtyping import Array, Float, Int

from hylo_jax.config import doc, require_positive
from hylo_jax.errors import ConfigError
from hylo_jax.kernels.gated_delta import gated_delta_rule, gated_delta_step
from hylo_jax.models.layers import Linear, RMSNorm, dtype_of
from hylo_jax.models.recurrent import CausalConv1d, init_a_log, init_dt_bias, padded_lengths
from hylo_jax.parallel import context
from hylo_jax.sharding import CONV_CACHE_AXES, STATE_CACHE_AXES, check_divides, constrain, constrain_dividing

ACT_HEADS = ("act_batch", "act_length", "act_heads", "act_head_dim")


@dataclasses.dataclass(frozen=True)
class GDNConfig:
    """A Gated DeltaNet mixer. Defaults are HyLo's: 6 heads, head_k_dim 256, expand_v 2 (head_v_dim 512)."""

    hidden_size: int = doc(512, "Model width d (input and output of the mixer).")
    num_heads: int = doc(6, "Heads H of q, k, v, the decay and the step size (HyLo: 6).")
    head_k_dim: int = doc(256, "Per-head width dk of queries and keys (HyLo: 256).")
    expand_v: float = doc(2.0, "head_v_dim = expand_v * head_k_dim, must be a whole number (HyLo: 2).")
    conv_kernel: int = doc(4, "Width K of the causal depthwise convolutions on q, k, v.")
    chunk_size: int = doc(64, "Chunk length of the chunked delta rule (a power of two).")
    norm_eps: float = doc(1e-6, "Epsilon of the per-head RMSNorm before the output gate.")
    A_init_range: tuple[float, float] = doc((0.0, 16.0), "A = exp(A_log) is drawn uniformly from [lo, hi) (fla).")
    dt_min: float = doc(0.001, "Smallest initial time step dt = softplus(dt_bias) (log-uniform, fla).")
    dt_max: float = doc(0.1, "Largest initial time step.")
    dt_init_floor: float = doc(1e-4, "Initial time steps are clamped to at least this.")
    dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "Compute dtype of activations.")
    param_dtype: Literal["float32", "bfloat16"] = doc("float32", "Storage dtype of parameters.")
    impl: Literal["auto", "pallas", "chunked", "reference"] = doc(
        "auto", "Delta rule kernel: auto (Pallas on GPU/TPU when supported, else chunked), pallas, chunkwise UT "
        "transform, or scan.")

    @property
    def head_v_dim(self) -> int:
        return round(self.expand_v * self.head_k_dim)

    def __post_init__(self) -> None:
        require_positive(self, "gdn.", ("hidden_size", "num_heads", "head_k_dim", "conv_kernel"))
        if self.expand_v <= 0 or self.expand_v * self.head_k_dim != self.head_v_dim:
            raise ConfigError(f"gdn.expand_v={self.expand_v} times gdn.head_k_dim={self.head_k_dim} must be a "
                              "positive whole number (head_v_dim)")
        if self.chunk_size <= 0 or self.chunk_size & (self.chunk_size - 1):
            raise ConfigError(f"gdn.chunk_size must be a positive power of two, got {self.chunk_size}")
        if self.norm_eps <= 0:
            raise ConfigError(f"gdn.norm_eps must be positive, got {self.norm_eps}")
        lo, hi = self.A_init_range
        if not 0 <= lo < hi:
            raise ConfigError(f"gdn.A_init_range must satisfy 0 <= lo < hi, got {self.A_init_range}")
        if not 0 < self.dt_min <= self.dt_max or self.dt_init_floor <= 0:
            raise ConfigError(f"gdn.dt_min={self.dt_min}, gdn.dt_max={self.dt_max} and gdn.dt_init_floor="
                              f"{self.dt_init_floor} must satisfy 0 < dt_min <= dt_max and dt_init_floor > 0")
        if self.impl not in ("auto", "pallas", "chunked", "reference"):
            raise ConfigError(f"gdn.impl must be 'auto', 'pallas', 'chunked' or 'reference', got {self.impl!r}")


@struct.dataclass
class GDNCache:
    """Decode state of one mixer: the last K-1 inputs of each conv [b, K-1, channels] (compute dtype) and the
    delta-rule state [b, H, dk, dv] (fp32). Conv rows that belong to an earlier document are zeros."""

    q_conv: jax.Array
    k_conv: jax.Array
    v_conv: jax.Array
    state: jax.Array

    @classmethod
    def zeros(cls, batch: int, cfg: GDNConfig) -> GDNCache:
        dt, w, h = dtype_of(cfg.dtype), cfg.conv_kernel - 1, cfg.num_heads
        conv = lambda dim: constrain_dividing(jnp.zeros((batch, w, h * dim), dt), CONV_CACHE_AXES)  # noqa: E731
        state = jnp.zeros((batch, h, cfg.head_k_dim, cfg.head_v_dim), jnp.float32)
        return cls(conv(cfg.head_k_dim), conv(cfg.head_k_dim), conv(cfg.head_v_dim),
                   constrain_dividing(state, STATE_CACHE_AXES))


class GatedDeltaNet(nnx.Module):
    """Gated DeltaNet mixer with the `transformer.Attention` call interface (see the module docstring)."""

    def __init__(self, cfg: GDNConfig, *, rngs: nnx.Rngs):
        pd = dtype_of(cfg.param_dtype)
        kw = dict(rngs=rngs, dtype=dtype_of(cfg.dtype), param_dtype=pd)
        d, h, kd, vd = cfg.hidden_size, cfg.num_heads, cfg.num_heads * cfg.head_k_dim, cfg.num_heads * cfg.head_v_dim
        self.q_proj = Linear(d, kd, axes=("embed", "q_heads"), **kw)
        self.k_proj = Linear(d, kd, axes=("embed", "q_heads"), **kw)
        self.v_proj = Linear(d, vd, axes=("embed", "q_heads"), **kw)
        self.a_proj = Linear(d, h, axes=("embed", "q_heads"), **kw)
        self.b_proj = Linear(d, h, axes=("embed", "q_heads"), **kw)
        self.g_proj = Linear(d, vd, axes=("embed", "q_heads"), **kw)
        conv = dict(kernel_size=cfg.conv_kernel, use_bias=False, rngs=rngs, param_dtype=pd,
                    channel_axis="q_heads")
        self.q_conv1d, self.k_conv1d = CausalConv1d(kd, **conv), CausalConv1d(kd, **conv)
        self.v_conv1d = CausalConv1d(vd, **conv)
        self.A_log = nnx.Param(init_a_log(rngs.params(), h, *cfg.A_init_range, pd), logical_axes=("q_heads",))
        self.dt_bias = nnx.Param(init_dt_bias(rngs.params(), h, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor, pd),
                                 logical_axes=("q_heads",))
        self.o_norm = RMSNorm(cfg.head_v_dim, eps=cfg.norm_eps, param_dtype=pd, axes=("head_dim",))
        self.o_proj = Linear(vd, d, axes=("q_heads", "embed"), **kw)
        self.cfg = cfg

    def __call__(self, x: Float[Array, "b t d"], *, positions: Int[Array, "b t"] | None = None,
                 segment_ids: Int[Array, "b t"] | None = None, cache: GDNCache | None = None,
                 kv_length=None) -> tuple[Float[Array, "b t d"], GDNCache | None]:
        """Mixes x causally; with `segment_ids` nothing crosses a document boundary (convs masked, state reset).

        With a cache, x continues after the cached tokens and the updated cache is returned; the cached state
        only feeds x's first document. Tokens at `positions` >= `kv_length` are right padding of a chunked
        prefill: they leave the conv and recurrent states as they were.
        """
        cfg = self.cfg
        b, t, _ = x.shape
        h = cfg.num_heads
        cached = cache is not None
        cache = cache if cached else GDNCache.zeros(b, cfg)
        lengths = padded_lengths(positions, kv_length) if cached else None
        q, q_conv = self.q_conv1d(self.q_proj(x), cache.q_conv, segment_ids, lengths)
        k, k_conv = self.k_conv1d(self.k_proj(x), cache.k_conv, segment_ids, lengths)
        v, v_conv = self.v_conv1d(self.v_proj(x), cache.v_conv, segment_ids, lengths)
        q, k, v = (jax.nn.silu(a).astype(x.dtype) for a in (q, k, v))
        q = constrain(q.reshape(b, t, h, cfg.head_k_dim), ACT_HEADS)
        k = constrain(k.reshape(b, t, h, cfg.head_k_dim), ACT_HEADS)
        v = constrain(v.reshape(b, t, h, cfg.head_v_dim), ACT_HEADS)
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))
        g = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(
            self.a_proj(x).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        if lengths is not None:  # padding tokens keep the state: decay 1 (g = 0), no write (beta = 0)
            real = jnp.arange(t) < lengths[:, None]
            g, beta = jnp.where(real[..., None], g, 0.0), jnp.where(real[..., None], beta, 0.0)
        if t == 1:  # decode: one recurrence step, no chunk padding
            o, state = gated_delta_step(cache.state, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0],
                                        use_qk_l2norm=True)
            o = o[:, None]
        elif not cached and context.active_mesh() is not None:  # context parallel
            o, state = context.gated_delta_rule(q, k, v, g, beta, segment_ids=segment_ids, use_qk_l2norm=True,
                                                chunk_size=cfg.chunk_size, impl=cfg.impl)
        else:
            o, state = gated_delta_rule(q, k, v, g, beta, initial_state=cache.state, segment_ids=segment_ids,
                                        use_qk_l2norm=True, chunk_size=cfg.chunk_size, impl=cfg.impl)
        gate = jax.nn.silu(self.g_proj(x).astype(jnp.float32)).reshape(b, t, h, cfg.head_v_dim)
        o = (self.o_norm(o.astype(jnp.float32)) * gate).astype(x.dtype)
        y = self.o_proj(o.reshape(b, t, h * cfg.head_v_dim))
        return y, (GDNCache(q_conv, k_conv, v_conv, state) if cached else None)

    def init_cache(self, batch: int, max_len: int) -> GDNCache:
        """A fixed-size state: independent of `max_len`."""
        del max_len
        return GDNCache.zeros(batch, self.cfg)


def check_mesh(cfg: GDNConfig, mesh: jax.sharding.Mesh) -> None:
    """`MeshError` unless tensor parallelism splits whole heads (every head-flattened axis is on "tensor")."""
    check_divides(mesh, "gdn.num_heads", cfg.num_heads, ("tensor",))
