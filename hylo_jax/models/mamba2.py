"""The Mamba2 mixer (Dao & Gu 2024) in Flax NNX, standard or HyLo "GQA-shaped".

For hidden states x [b, t, d], with H heads of width P, state width N, kernel width K:

    [z ; u ; dt] = in_proj(x)                         z [H*P], u = [x_s ; B ; C] (conv channels), dt [H]
    u_t = silu(bias + sum_k kernel[k] * u_{t-K+1+k})   causal depthwise conv within each document
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t          A = -exp(A_log), dt = clip(softplus(dt + dt_bias))
    y_t = h_t @ C_t + D x_t                           per head (kernels.ssd)
    out = out_proj(RMSNorm_groups(y * silu(z)) * scale)

Standard: x_s has H heads, B and C have n_groups groups (head h reads group h // (H / n_groups)).
GQA-shaped (MambaInLlama / HyLo, `num_xb_heads` = the teacher's KV heads): x_s and B have
num_xb_heads heads, each repeated to H / num_xb_heads consecutive heads after the conv (like GQA's
repeat_kv; x_s ~ values, B ~ keys); C ~ queries has one group per head (n_groups == H).

Parameter names follow transformers' Mamba2Mixer: in_proj, conv1d, dt_bias, A_log, D, norm, out_proj.
Our conv1d.kernel is [K, channels]; transformers' conv1d.weight is [channels, 1, K].
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
from hylo_jax.kernels.ssd import discretize_dt, ssd, ssd_step
from hylo_jax.models.layers import Linear, dtype_of
from hylo_jax.models.recurrent import CausalConv1d, init_a_log, init_dt_bias, padded_lengths
from hylo_jax.parallel import context
from hylo_jax.sharding import CONV_CACHE_AXES, STATE_CACHE_AXES, constrain, constrain_dividing

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Mamba2Config:
    """A Mamba2 mixer of one layer."""

    hidden_size: int = doc(512, "Model width d.")
    num_heads: int = doc(8, "SSM heads H.")
    head_dim: int = doc(64, "Per-head width P of x (d_inner = num_heads * head_dim).")
    d_state: int = doc(64, "State width N of B and C.")
    n_groups: int = doc(1, "Groups of B and C (standard); must equal num_heads when GQA-shaped.")
    num_xb_heads: int = doc(0, "GQA-shaped: heads of x and B, each repeated to num_heads / "
                               "num_xb_heads heads (HyLo: the teacher's KV heads); 0 = standard.")
    conv_kernel: int = doc(4, "Width K of the causal depthwise convolution.")
    chunk_size: int = doc(64, "Chunk length of the SSD scan (a power of two).")
    norm_eps: float = doc(1e-5, "Epsilon of the gated RMSNorm.")
    norm_group_size: int = doc(0, "Channels per RMS group of the gated norm; 0 = d_inner / n_groups "
                                  "(transformers' and mamba_ssm's choice, needed for export).")
    dt_min: float = doc(1e-3, "Fresh init: dt ~ logUniform(dt_min, dt_max).")
    dt_max: float = doc(0.1, "Fresh init: dt ~ logUniform(dt_min, dt_max).")
    dt_init_floor: float = doc(1e-4, "Fresh init: dt is at least this.")
    A_init_range: tuple[float, float] = doc((1.0, 16.0), "Fresh init: -A ~ Uniform(*A_init_range).")
    dt_limit: tuple[float, float] = doc((0.0, float("inf")), "dt is clipped to [lo, hi] after softplus.")
    use_conv_bias: bool = doc(True, "Bias of the convolution.")
    use_bias: bool = doc(False, "Biases of in_proj and out_proj.")
    dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "Compute dtype of activations.")
    param_dtype: Literal["float32", "bfloat16"] = doc("float32", "Storage dtype of parameters.")
    impl: Literal["auto", "pallas", "chunked", "reference"] = doc(
        "auto", "SSD scan: auto (Pallas on GPU/TPU when supported, else chunked), pallas, chunked, or the "
        "sequential oracle.")

    def __post_init__(self) -> None:
        require_positive(self, "mamba2.", ("hidden_size", "num_heads", "head_dim", "d_state", "n_groups",
                                           "conv_kernel", "chunk_size"))
        if self.chunk_size & (self.chunk_size - 1):
            raise ConfigError(f"mamba2.chunk_size={self.chunk_size} is not a power of two")
        if self.num_heads % self.n_groups:
            raise ConfigError(f"mamba2.num_heads={self.num_heads} is not a multiple of "
                              f"mamba2.n_groups={self.n_groups}")
        if self.num_xb_heads < 0:
            raise ConfigError(f"mamba2.num_xb_heads must be positive or 0 (standard), "
                              f"got {self.num_xb_heads}")
        if self.num_xb_heads:
            if self.num_heads % self.num_xb_heads:
                raise ConfigError(f"mamba2.num_heads={self.num_heads} is not a multiple of "
                                  f"mamba2.num_xb_heads={self.num_xb_heads}")
            if self.n_groups != self.num_heads:
                raise ConfigError(f"GQA-shaped mamba2 (num_xb_heads={self.num_xb_heads}) needs one C "
                                  f"group per head: n_groups={self.n_groups} != "
                                  f"num_heads={self.num_heads}")
        if self.norm_group_size < 0 or self.d_inner % self.group_size:
            raise ConfigError(f"mamba2.norm_group_size={self.norm_group_size} must be 0 or divide "
                              f"d_inner = num_heads * head_dim = {self.d_inner}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"mamba2 needs 0 < dt_min <= dt_max, got dt_min={self.dt_min}, "
                              f"dt_max={self.dt_max}")
        if not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ConfigError(f"mamba2.A_init_range={self.A_init_range} must be (lo, hi) with "
                              "0 < lo <= hi")
        if not 0 <= self.dt_limit[0] <= self.dt_limit[1]:
            raise ConfigError(f"mamba2.dt_limit={self.dt_limit} must be (lo, hi) with 0 <= lo <= hi")

    @property
    def d_inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def xb_heads(self) -> int:
        """Heads of x and groups of B before repetition."""
        return self.num_xb_heads or self.num_heads

    @property
    def b_groups(self) -> int:
        return self.num_xb_heads or self.n_groups

    @property
    def conv_channels(self) -> int:
        """Width of [x ; B ; C], the convolution's input."""
        return self.xb_heads * self.head_dim + (self.b_groups + self.n_groups) * self.d_state

    @property
    def group_size(self) -> int:
        return self.norm_group_size or self.d_inner // self.n_groups


@struct.dataclass
class Mamba2Cache:
    """Decode state of one Mamba2 layer: the last K-1 conv inputs [b, K-1, channels] (compute dtype;
    rows from an earlier document than the last token are zero) and the SSM state [b, H, P, N] fp32."""

    conv: jax.Array
    ssm: jax.Array

    @classmethod
    def zeros(cls, batch: int, cfg: Mamba2Config) -> Mamba2Cache:
        conv = jnp.zeros((batch, cfg.conv_kernel - 1, cfg.conv_channels), dtype_of(cfg.dtype))
        ssm = jnp.zeros((batch, cfg.num_heads, cfg.head_dim, cfg.d_state), _F32)
        return cls(constrain_dividing(conv, CONV_CACHE_AXES), constrain_dividing(ssm, STATE_CACHE_AXES))


class GatedRMSNorm(nnx.Module):
    """y = scale * g / sqrt(mean_group(g^2) + eps) with g = x * silu(z), the mean taken over
    consecutive groups of `group_size` channels (transformers' MambaRMSNormGated), in fp32."""

    def __init__(self, features: int, group_size: int, *, eps: float, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=("q_heads",))
        self.group_size = group_size
        self.eps = eps

    def __call__(self, x: Float[Array, "... d"], z: Float[Array, "... d"]) -> Float[Array, "... d"]:
        g = x.astype(_F32) * jax.nn.silu(z.astype(_F32))
        grouped = g.reshape(*g.shape[:-1], -1, self.group_size)
        grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped * grouped, -1, keepdims=True) + self.eps)
        return (grouped.reshape(g.shape) * self.scale[...].astype(_F32)).astype(x.dtype)


class Mamba2Mixer(nnx.Module):
    """The Mamba2 block's mixer; same call interface as `transformer.Attention`."""

    def __init__(self, cfg: Mamba2Config, *, rngs: nnx.Rngs):
        dt, pd = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        kw = dict(rngs=rngs, dtype=dt, param_dtype=pd, use_bias=cfg.use_bias)
        h = cfg.num_heads
        # [z ; x ; B ; C ; dt] concatenates differently sharded pieces: output axis replicated.
        self.in_proj = Linear(cfg.hidden_size, cfg.d_inner + cfg.conv_channels + h,
                              axes=("embed", None), **kw)
        # Channels concatenate x, B and C, which tensor parallelism would split differently:
        # replicated until the mixer is made tensor parallel.
        self.conv1d = CausalConv1d(cfg.conv_channels, cfg.conv_kernel, use_bias=cfg.use_conv_bias,
                                   rngs=rngs, param_dtype=pd)
        self.dt_bias = nnx.Param(init_dt_bias(rngs.params(), h, cfg.dt_min, cfg.dt_max,
                                              cfg.dt_init_floor, pd), logical_axes=("q_heads",))
        self.A_log = nnx.Param(init_a_log(rngs.params(), h, *cfg.A_init_range, pd),
                               logical_axes=("q_heads",))
        self.D = nnx.Param(jnp.ones((h,), pd), logical_axes=("q_heads",))
        self.norm = GatedRMSNorm(cfg.d_inner, cfg.group_size, eps=cfg.norm_eps, param_dtype=pd)
        self.out_proj = Linear(cfg.d_inner, cfg.hidden_size, axes=("q_heads", "embed"), **kw)
        self.cfg = cfg

    def __call__(self, x: Float[Array, "b t d"], *, positions: Int[Array, "b t"] | None,
                 segment_ids: Int[Array, "b t"] | None = None, cache: Mamba2Cache | None = None,
                 kv_length=None) -> tuple[Float[Array, "b t d"], Mamba2Cache | None]:
        """Mixes t tokens; with a cache they continue the cached sequence (its last document) and
        the updated cache is returned. Tokens at `positions` >= `kv_length` are right padding of a
        chunked prefill: they leave the conv and SSM states as they were (dt = 0)."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, p, n = cfg.num_heads, cfg.head_dim, cfg.d_state
        z, u, dt = jnp.split(self.in_proj(x), [cfg.d_inner, cfg.d_inner + cfg.conv_channels], -1)
        prefix = (cache.conv if cache is not None
                  else jnp.zeros((b, cfg.conv_kernel - 1, cfg.conv_channels), u.dtype))
        lengths = padded_lengths(positions, kv_length) if cache is not None else None
        u, conv_state = self.conv1d(u, prefix, segment_ids, lengths)
        u = jax.nn.silu(u).astype(z.dtype)
        xw, bw = cfg.xb_heads * p, cfg.b_groups * n
        xs, B, C = jnp.split(u, [xw, xw + bw], -1)
        xs, B = xs.reshape(b, t, cfg.xb_heads, p), B.reshape(b, t, cfg.b_groups, n)
        C = C.reshape(b, t, cfg.n_groups, n)
        if cfg.num_xb_heads:  # each x/B head serves H / num_xb_heads consecutive heads
            xs, B = jnp.repeat(xs, h // cfg.xb_heads, axis=2), jnp.repeat(B, h // cfg.xb_heads, axis=2)
        xs = constrain(xs, ("act_batch", "act_length", "act_heads", "act_head_dim"))
        A = -jnp.exp(self.A_log[...].astype(_F32))
        kw = dict(D=self.D[...], dt_bias=self.dt_bias[...], dt_limit=cfg.dt_limit)
        if lengths is not None:  # discretise here so that padding gets dt = 0: decay 1, no input
            real = (jnp.arange(t) < lengths[:, None])[..., None]
            dt = jnp.where(real, discretize_dt(dt, kw["dt_bias"], True, cfg.dt_limit), 0.0)
            kw = dict(D=kw["D"], dt_softplus=False)
        if cache is not None and t == 1:
            y, ssm = ssd_step(cache.ssm, xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], **kw)
            y = y[:, None]
        elif cache is None and context.active_mesh() is not None:  # context parallel
            y, ssm = context.ssd(xs, dt, A, B, C, segment_ids=segment_ids, chunk_size=cfg.chunk_size,
                                 impl=cfg.impl, **kw)
        else:
            y, ssm = ssd(xs, dt, A, B, C, initial_state=None if cache is None else cache.ssm,
                         segment_ids=segment_ids, chunk_size=cfg.chunk_size, impl=cfg.impl, **kw)
        out = self.out_proj(self.norm(y.reshape(b, t, h * p), z))
        return out, (None if cache is None else Mamba2Cache(conv_state, ssm))

    def init_cache(self, batch: int, max_len: int) -> Mamba2Cache:
        """A fixed-size state: independent of `max_len`."""
        del max_len
        return Mamba2Cache.zeros(batch, self.cfg)
