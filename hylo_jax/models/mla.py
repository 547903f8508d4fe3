"""Multi-Head Latent Attention (MLA, DeepSeek-V2/V3) with HyLo's grouped key/value heads.

For hidden states h (one token), with r = kv_lora_rank, dn/dr = qk_nope/qk_rope_head_dim:

    c_Q = norm(W_DQ h)                    (q_lora_rank > 0; else q = W_Q h)
    [q_nope ; q_rope]_i = (W_UQ c_Q)_i    per query head i
    [c_KV ; k_rope] = W_DKV h             k_rope [dr] is shared by every head
    c_KV = norm(c_KV)                     (latent_norm; DeepSeek on, HyLo off)
    [k_nope ; v]_g = (W_UKV c_KV)_g       per key/value head g (HyLo: the teacher's KV head count;
                                          query head i uses g = i // (num_heads / num_kv_heads))
    score_ij = ([q_nope ; rope(q_rope)]_i . [k_nope ; rope(k_rope)]_g) / sqrt(dn + dr) * m
    y = W_O concat_i(softmax_j(score_ij) v_gj)

m is DeepSeek's YaRN softmax correction (`rope.yarn_softmax_scale`). Training decompresses K/V and
calls the shared attention kernel. The cache keeps only the latent [c_KV ; rope(k_rope)] (r + dr
numbers per token and layer). Decode (fewer than DECOMPRESS_MIN_QUERIES new tokens) absorbs W_UK into
the query (q_nope_i W_UK_g^T lives in latent space) and W_UV into the output, so no per-head K/V
exists; prefill chunks decompress the cache one visited block at a time (fewer FLOPs per key).

Parameter names follow transformers' DeepseekV3Attention: q_a_proj, q_a_layernorm, q_b_proj
(or q_proj), kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj (per kv head [k_nope ; v]), o_proj.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from hylo_jax.config import RopeConfig, doc, require_positive
from hylo_jax.errors import ConfigError
from hylo_jax.kernels import flash_decode
from hylo_jax.kernels.attention import attention, cache_slots, cached_attention, cached_impl, latent_cached_attention
from hylo_jax.kernels.pallas_common import on_mesh
from hylo_jax.models.layers import Linear, RMSNorm, dtype_of
from hylo_jax.models.rope import apply_rope, rope_cos_sin, yarn_softmax_scale
from hylo_jax.parallel import context
from hylo_jax.sharding import constrain, constrain_dividing

log = logging.getLogger(__name__)

# Logical axis of the low-rank latent dimensions (see sharding.LOGICAL_RULES).
LATENT = "latent"


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention of one layer."""

    hidden_size: int = doc(512, "Model width d.")
    num_heads: int = doc(8, "Query heads.")
    num_kv_heads: int = doc(8, "Key/value up-projection heads (DeepSeek: num_heads; HyLo: the "
                            "teacher's KV heads, each shared by num_heads/num_kv_heads queries).")
    q_lora_rank: int = doc(0, "Query compression rank (q_a_proj -> q_b_proj); 0 = plain q_proj.")
    kv_lora_rank: int = doc(128, "Key/value latent width r (the cached c_KV).")
    qk_nope_head_dim: int = doc(64, "Per-head query/key width without RoPE.")
    qk_rope_head_dim: int = doc(32, "Per-head query width with RoPE; the rotary key is shared.")
    v_head_dim: int = doc(64, "Per-head value width.")
    latent_norm: bool = doc(False, "RMSNorm on the q and kv latents (DeepSeek True, HyLo False).")
    rms_norm_eps: float = doc(1e-6, "Epsilon of the latent RMSNorms.")
    rope: RopeConfig = doc(RopeConfig, "Rotary embedding of the qk_rope dimensions.", factory=True)
    dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "Compute dtype.")
    param_dtype: Literal["float32", "bfloat16"] = doc("float32", "Storage dtype of parameters.")
    attention_impl: Literal["auto", "xla", "cudnn", "splash"] = doc(
        "auto", "Attention kernel of the training/prefill path (see kernels.attention).")
    max_segments: int = doc(0, "Packed-layout bound of the training attention (ModelConfig.max_segments).")
    decode_impl: Literal["auto", "xla", "pallas"] = doc(
        "auto", "Single-token decode over the latent cache: the Pallas flash-decode kernel that reads each "
                "cached latent once (kernels.flash_decode; 1.5-4x faster than XLA on an H100, "
                "benchmarks/decode_attention.py; 'pallas' runs it interpreted on CPU) or XLA's blocked "
                "online softmax. 'auto': the kernel on GPU where it takes the shape, else XLA.")

    def __post_init__(self) -> None:
        require_positive(self, "mla.", ("hidden_size", "num_heads", "num_kv_heads", "kv_lora_rank",
                                        "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
        if self.q_lora_rank < 0:
            raise ConfigError(f"mla.q_lora_rank must be positive or 0 (plain q_proj), "
                              f"got {self.q_lora_rank}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"mla.num_heads={self.num_heads} is not a multiple of "
                              f"mla.num_kv_heads={self.num_kv_heads}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"mla.qk_rope_head_dim={self.qk_rope_head_dim} must be even for RoPE")
        if self.v_head_dim > self.qk_head_dim:
            raise ConfigError(f"mla.v_head_dim={self.v_head_dim} exceeds the query/key head width "
                              f"qk_nope_head_dim + qk_rope_head_dim = {self.qk_head_dim}, which "
                              "the attention kernel does not support")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Width of one cached token: c_KV and the rotated shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


DECOMPRESS_MIN_QUERIES = 64  # cached calls with this many new tokens attend decompressed blocks, not latents


@functools.cache
def _decode_kernel_takes(heads: int, cfg: MLAConfig, slots: int) -> bool:
    """Whether single-token decode takes the flash-decode kernel: on GPU ('auto' or 'pallas') or
    interpreted on CPU ('pallas', for tests) when it supports the shape; else XLA, saying why once."""
    backend = jax.default_backend()
    if cfg.decode_impl == "xla" or (cfg.decode_impl == "auto" and backend != "gpu"):
        return False
    if backend == "tpu":
        reason = "the kernel is written for the GPU (Pallas Triton backend); TPU decodes with XLA"
    else:
        reason = flash_decode.unsupported(heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, slots)
    if reason:
        (log.warning if cfg.decode_impl == "pallas" else log.info)(
            "mla.decode_impl=%r: flash-decode kernel not taken, XLA decodes: %s", cfg.decode_impl, reason)
    return reason is None


def mla_cache_bytes_per_token(cfg: MLAConfig, dtype_bytes: int) -> int:
    """Decode cache size of one token in one layer: (kv_lora_rank + qk_rope_head_dim) numbers."""
    return cfg.latent_dim * dtype_bytes


@struct.dataclass
class MLACache:
    """Preallocated latents of one MLA layer: [batch, max_len, kv_lora_rank + qk_rope_head_dim],
    each slot [c_KV (normed) ; k_rope (rotated)]."""

    latent: jax.Array

    @classmethod
    def zeros(cls, batch: int, max_len: int, cfg: MLAConfig) -> MLACache:
        latent = jnp.zeros((batch, cache_slots(max_len), cfg.latent_dim), dtype_of(cfg.dtype))
        return cls(constrain_dividing(latent, ("act_batch", None, None)))  # every head reads all of it

    def write(self, latent: Float[Array, "b t l"], positions: Int[Array, "b t"]) -> MLACache:
        """Stores the new tokens' latents at their positions (one slot per position)."""
        rows = jnp.arange(latent.shape[0])[:, None]
        return MLACache(self.latent.at[rows, positions].set(latent.astype(self.latent.dtype)))


class MLA(nnx.Module):
    """Multi-head latent attention; same call interface as `transformer.Attention`."""

    def __init__(self, cfg: MLAConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        pd = dtype_of(cfg.param_dtype)
        d, q_width = cfg.hidden_size, cfg.num_heads * cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(d, cfg.q_lora_rank, axes=("embed", LATENT), **kw)
            self.q_a_layernorm = (RMSNorm(cfg.q_lora_rank, eps=cfg.rms_norm_eps, param_dtype=pd)
                                  if cfg.latent_norm else None)
            self.q_b_proj = Linear(cfg.q_lora_rank, q_width, axes=(LATENT, "q_heads"), **kw)
        else:
            self.q_proj = Linear(d, q_width, axes=("embed", "q_heads"), **kw)
        self.kv_a_proj_with_mqa = Linear(d, cfg.latent_dim, axes=("embed", LATENT), **kw)
        self.kv_a_layernorm = (RMSNorm(cfg.kv_lora_rank, eps=cfg.rms_norm_eps, param_dtype=pd)
                               if cfg.latent_norm else None)
        self.kv_b_proj = Linear(cfg.kv_lora_rank,
                                cfg.num_kv_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                axes=(LATENT, "kv_heads"), **kw)
        self.o_proj = Linear(cfg.num_heads * cfg.v_head_dim, d, axes=("q_heads", "embed"), **kw)
        self.cfg = cfg

    def _queries(self, x: Float[Array, "b t d"]) -> Float[Array, "b t h dq"]:
        """[q_nope ; q_rope] per head, before RoPE."""
        cfg = self.cfg
        if cfg.q_lora_rank:
            c_q = self.q_a_proj(x)
            if self.q_a_layernorm is not None:
                c_q = self.q_a_layernorm(c_q)
            q = self.q_b_proj(c_q)
        else:
            q = self.q_proj(x)
        return q.reshape(*x.shape[:2], cfg.num_heads, cfg.qk_head_dim)

    def _latents(self, x: Float[Array, "b t d"], cos, sin) -> Float[Array, "b t l"]:
        """[norm(c_KV) ; rope(k_rope)] of each token: what the decode cache stores."""
        r = self.cfg.kv_lora_rank
        ckv = self.kv_a_proj_with_mqa(x)
        c, k_rope = ckv[..., :r], ckv[..., r:]
        if self.kv_a_layernorm is not None:
            c = self.kv_a_layernorm(c)
        k_rope = apply_rope(k_rope[:, :, None, :], cos, sin)[:, :, 0, :]
        return jnp.concatenate([c, k_rope], axis=-1)

    def _up_kernels(self) -> tuple[Float[Array, "r g dn"], Float[Array, "r g dv"]]:
        """kv_b_proj's kernel split per kv head into W_UK [r, g, dn] and W_UV [r, g, dv]."""
        cfg = self.cfg
        w = self.kv_b_proj.kernel[...].astype(dtype_of(cfg.dtype))
        w = w.reshape(cfg.kv_lora_rank, cfg.num_kv_heads, cfg.qk_nope_head_dim + cfg.v_head_dim)
        return w[..., :cfg.qk_nope_head_dim], w[..., cfg.qk_nope_head_dim:]

    def __call__(self, x: Float[Array, "b t d"], *, positions: Int[Array, "b t"], segment_ids=None,
                 cache: MLACache | None = None, kv_length=None
                 ) -> tuple[Float[Array, "b t d"], MLACache | None]:
        """Causal MLA at `positions`; with a cache, the new latents are written into it and the
        queries attend its first `kv_length` slots in latent space (decode / chunked prefill)."""
        cfg = self.cfg
        b, t, _ = x.shape
        dn = cfg.qk_nope_head_dim
        scale = cfg.qk_head_dim ** -0.5 * yarn_softmax_scale(cfg.rope)
        cos, sin = rope_cos_sin(positions, cfg.rope, cfg.qk_rope_head_dim)
        q = self._queries(x)
        q_nope, q_rope = q[..., :dn], apply_rope(q[..., dn:], cos, sin)
        latent = self._latents(x, cos, sin)
        if cache is None and context.active_mesh() is not None:  # context parallel: latents travel
            w_uk, w_uv = self._up_kernels()
            q = jnp.concatenate([q_nope, q_rope], -1)
            out = context.mla_attention(q, latent, w_uk, w_uv, kv_lora_rank=cfg.kv_lora_rank,
                                        segment_ids=segment_ids, scale=scale)
        elif cache is None:
            out = self._decompressed(q_nope, q_rope, latent, segment_ids, scale)
        else:
            cache = cache.write(latent, positions)
            cached = self._absorbed if t < DECOMPRESS_MIN_QUERIES else self._decompressed_blocks
            out = cached(q_nope, q_rope, cache.latent, positions, kv_length, scale)
        out = checkpoint_name(out, "attention_out")
        return self.o_proj(out.reshape(b, t, -1)), cache

    def init_cache(self, batch: int, max_len: int) -> MLACache:
        return MLACache.zeros(batch, max_len, self.cfg)

    def _decompressed(self, q_nope: Float[Array, "b t h dn"], q_rope: Float[Array, "b t h dr"],
                      latent: Float[Array, "b t l"], segment_ids: Int[Array, "b t"] | None,
                      scale: float) -> Float[Array, "b t h dv"]:
        """k_g = [c W_UK_g ; k_rope], v_g = c W_UV_g, then the shared causal attention kernel."""
        cfg = self.cfg
        w_uk, w_uv = self._up_kernels()
        c, k_rope = latent[..., :cfg.kv_lora_rank], latent[..., cfg.kv_lora_rank:]
        k_nope = jnp.einsum("btr,rgn->btgn", c, w_uk)
        v = jnp.einsum("btr,rgv->btgv", c, w_uv)
        k_rope = jnp.broadcast_to(k_rope[:, :, None, :], (*k_nope.shape[:3], cfg.qk_rope_head_dim))
        k = jnp.concatenate([k_nope, k_rope], -1)
        q = constrain(jnp.concatenate([q_nope, q_rope], -1),
                      ("act_batch", "act_length", "act_heads", "act_head_dim"))
        k = constrain(k, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
        return attention(q, k, v, segment_ids=segment_ids, scale=scale, impl=cfg.attention_impl,
                         max_segments=cfg.max_segments)

    def _decompressed_blocks(self, q_nope: Float[Array, "b t h dn"], q_rope: Float[Array, "b t h dr"],
                             latent: Float[Array, "b s l"], positions: Int[Array, "b t"],
                             kv_length: Int[Array, "b"], scale: float) -> Float[Array, "b t h dv"]:
        """Prefill chunks: each visited cache block is decompressed to k_g = [c W_UK_g ; k_rope],
        v_g = c W_UV_g. Per (query, key, head) that is 2 (dn + dr + dv) FLOPs against the absorbed form's
        2 (2 r + dr): 3.4x fewer at Llama-1B shapes, for one block's decompression per step. Under a mesh
        it runs per device over rows and KV heads (each device decompresses its heads of the shared latent)."""
        cfg = self.cfg
        b, t, h, _ = q_nope.shape
        g, r = cfg.num_kv_heads, cfg.kv_lora_rank
        impl = cached_impl(cfg.attention_impl)

        def attend(q, latent, w_uk, w_uv, positions, kv_length):
            def expand(block, _):  # [b, n, 1, l] latent block -> keys [b, n, g, dn + dr], values [b, n, g, dv]
                c, k_rope = block[:, :, 0, :r], block[:, :, 0, r:]
                k_nope = jnp.einsum("bsr,rgn->bsgn", c, w_uk)
                k_rope = jnp.broadcast_to(k_rope[:, :, None, :], (*k_nope.shape[:3], cfg.qk_rope_head_dim))
                return jnp.concatenate([k_nope, k_rope], -1), jnp.einsum("bsr,rgv->bsgv", c, w_uv)

            stored = latent[:, :, None, :]
            return cached_attention(q, stored, stored, q_positions=positions, kv_length=kv_length, scale=scale,
                                    expand=expand, impl=impl)

        def specs(rows, heads):
            up = P(None, heads, None)
            return (P(rows, None, heads), P(rows), up, up, P(rows), P(rows)), P(rows, None, heads)

        q = jnp.concatenate([q_nope, q_rope], -1).reshape(b, t, g, h // g, -1)
        out = on_mesh(attend, specs, b, g)(q, latent, *self._up_kernels(), positions, kv_length)
        return out.reshape(b, t, h, cfg.v_head_dim)

    def _absorbed(self, q_nope: Float[Array, "b t h dn"], q_rope: Float[Array, "b t h dr"],
                  latent: Float[Array, "b s l"], positions: Int[Array, "b t"],
                  kv_length: Int[Array, "b"], scale: float) -> Float[Array, "b t h dv"]:
        """Attention over the latent cache with W_UK folded into the query and W_UV into the output:
        q_i . k_gj = [q_nope_i W_UK_g^T ; q_rope_i] . latent_j,  o_i = (sum_j p_ij c_j) W_UV_g."""
        cfg = self.cfg
        b, t, h, _ = q_nope.shape
        g = cfg.num_kv_heads
        w_uk, w_uv = self._up_kernels()
        q_nope = q_nope.reshape(b, t, g, h // g, -1)
        q_lat = jnp.einsum("btgqn,rgn->btgqr", q_nope, w_uk)
        q_abs = jnp.concatenate([q_lat, q_rope.reshape(b, t, g, h // g, -1)], -1).reshape(b, t, h, -1)
        if t == 1 and _decode_kernel_takes(h, cfg, latent.shape[1]):
            o_lat = flash_decode.latent_decode_attention(
                q_abs[:, 0], latent, jnp.minimum(kv_length, positions[:, 0] + 1), rank=cfg.kv_lora_rank,
                scale=scale, interpret=jax.default_backend() != "gpu")[:, None].astype(q_abs.dtype)
        else:  # every head reads the same latent
            o_lat = latent_cached_attention(q_abs, latent, rank=cfg.kv_lora_rank, q_positions=positions,
                                            kv_length=kv_length, scale=scale)
        o_lat = o_lat.reshape(b, t, g, h // g, -1)
        return jnp.einsum("btgqr,rgv->btgqv", o_lat, w_uv).reshape(b, t, h, cfg.v_head_dim)
