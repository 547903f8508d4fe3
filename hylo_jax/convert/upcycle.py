"""Upcycling: initialise a HyLo student from its teacher's weights.

Every layer copies the teacher's MLP and both RMSNorms; embeddings, final norm and LM head are
copied (an untied student head starts as the teacher's tied embedding). Mixers:
- attention (kept): copied.
- MLA (X-EcoMLA): W_Q = U S V^T, q_a = S_r V_r^T, q_b = U_r (per head: the first qk_nope rows and
  the last qk_rope rows of the teacher's head); [W_K; W_V] = U S V^T gives the KV latent
  down-projection S_r V_r^T and per-KV-head up-projections [k_nope; v] from U_r; the shared k_rope
  projection is the KV-head average of the last qk_rope rows of W_K; o_proj copied. These are the
  best rank-r factorisations (Eckart-Young).
- Mamba2 (MambaInLlama): x <- W_V, B <- W_K, C <- W_Q inside in_proj, out_proj <- W_O; z, dt,
  conv, A_log, dt_bias, D keep their fresh initialisation.
- GDN: W_K, W_V repeated from KV heads to query heads; the overlapping blocks of W_Q, W_K, W_V
  (rows) and W_O (columns) are copied into q/k/v/o_proj; gates, A_log, dt_bias, convs fresh.

Teacher specifics, handled deliberately: Qwen3's per-head q/k RMSNorm weights are folded into W_Q /
W_K as a diagonal scaling (the normalisation itself, being non-linear, is dropped); Qwen2's q/k/v
biases are dropped (MLA and the linear mixers have none). Weights are written W [out, in] here
(PyTorch's layout) and stored as kernels [in, out].
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hylo_jax.errors import ConfigError
from hylo_jax.models.gated_deltanet import GatedDeltaNet
from hylo_jax.models.hybrid import HybridConfig, ModelSpec
from hylo_jax.models.mamba2 import Mamba2Mixer
from hylo_jax.models.mla import MLA
from hylo_jax.models.transformer import Attention, CausalLM
from hylo_jax.sharding import reshard, reshard_state

log = logging.getLogger(__name__)


def _w(linear) -> jax.Array:
    """A Linear's weight in PyTorch layout [out, in], fp32."""
    return linear.kernel[...].astype(jnp.float32).T


def _set(linear, weight: jax.Array) -> None:
    """Stores W [out, in] into a Linear's kernel [in, out] (keeping its dtype and sharding)."""
    old = linear.kernel[...]
    if weight.T.shape != old.shape:
        raise ConfigError(f"upcycling shape mismatch: {weight.T.shape} into kernel {old.shape}")
    linear.kernel[...] = reshard(weight.T.astype(old.dtype), old.sharding)


def attention_weights(attn: Attention) -> dict[str, jax.Array]:
    """W_Q [H*dh, d], W_K, W_V [Hkv*dh, d], W_O [d, H*dh] with Qwen3's q/k norm scales folded in."""
    cfg = attn.cfg
    wq, wk = _w(attn.q_proj), _w(attn.k_proj)
    if attn.q_norm is not None:
        wq = wq * jnp.tile(attn.q_norm.scale[...].astype(jnp.float32), cfg.num_heads)[:, None]
        wk = wk * jnp.tile(attn.k_norm.scale[...].astype(jnp.float32), cfg.num_kv_heads)[:, None]
    return dict(q=wq, k=wk, v=_w(attn.v_proj), o=_w(attn.o_proj))


def energy_rank(singular_values: jax.Array, ratio: float, multiple: int = 8) -> int:
    """Smallest rank whose share of sum(sigma^2) reaches `ratio`, rounded up to a multiple."""
    energy = np.cumsum(np.asarray(singular_values, np.float64) ** 2)
    rank = int(np.searchsorted(energy / energy[-1], ratio) + 1)
    return min(math.ceil(rank / multiple) * multiple, len(energy))


def with_energy_ranks(teacher: CausalLM, plan: HybridConfig) -> HybridConfig:
    """`plan` with MLA latent ranks chosen by `plan.mla_energy_ratio` (unchanged when it is None):
    for every MLA layer the smallest ranks keeping that share of sigma^2 of W_Q and of [W_K; W_V]
    (rounded up to a multiple of 8); the largest over the layers, so one MLA shape fits all."""
    ratio = plan.mla_energy_ratio
    if ratio is None or not plan.mla_layers:
        return plan
    if not 0 < ratio <= 1:
        raise ConfigError(f"hybrid.mla_energy_ratio must be in (0, 1], got {ratio}")
    q_rank = kv_rank = 0
    for i in plan.mla_layers:
        w = attention_weights(teacher.model.layers[i].self_attn)
        kv = jnp.concatenate([w["k"], w["v"]])
        q_rank = max(q_rank, energy_rank(jnp.linalg.svd(w["q"], compute_uv=False), ratio))
        kv_rank = max(kv_rank, energy_rank(jnp.linalg.svd(kv, compute_uv=False), ratio))
    log.info("energy ratio %.3f: q_lora_rank %d, kv_lora_rank %d", ratio, q_rank, kv_rank)
    mla = dataclasses.replace(plan.mla, q_lora_rank=q_rank if plan.mla.q_lora_rank else 0, kv_lora_rank=kv_rank)
    return dataclasses.replace(plan, mla=mla)


def _head_rows(heads: int, head_dim: int, first: int, last: int) -> np.ndarray:
    """Row indices of each head's first `first` and last `last` rows, head after head."""
    per_head = np.concatenate([np.arange(first), np.arange(head_dim - last, head_dim)])
    return (np.arange(heads)[:, None] * head_dim + per_head).reshape(-1)


def init_mla(mla: MLA, w: dict[str, jax.Array], head_dim: int) -> None:
    """X-EcoMLA SVD initialisation of `mla` from teacher weights `w` (see module docstring)."""
    cfg = mla.cfg
    nope, rope, hkv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.num_kv_heads
    if nope + rope > head_dim or cfg.v_head_dim != head_dim:
        raise ConfigError(f"MLA needs qk_nope + qk_rope <= teacher head_dim ({nope}+{rope} vs "
                          f"{head_dim}) and v_head_dim == head_dim ({cfg.v_head_dim} vs {head_dim})")
    for name, rank, matrix in (("q_lora_rank", cfg.q_lora_rank, w["q"]),
                               ("kv_lora_rank", cfg.kv_lora_rank, jnp.concatenate([w["k"], w["v"]]))):
        if rank > min(matrix.shape):
            raise ConfigError(f"mla.{name}={rank} exceeds the rank of the teacher's matrix it factorises "
                              f"({min(matrix.shape)} = min{tuple(matrix.shape)})")
    q_rows = _head_rows(cfg.num_heads, head_dim, nope, rope)
    if cfg.q_lora_rank:
        u, s, vt = jnp.linalg.svd(w["q"], full_matrices=False)
        r = cfg.q_lora_rank
        _set(mla.q_a_proj, s[:r, None] * vt[:r])
        _set(mla.q_b_proj, u[q_rows, :r])
    else:
        _set(mla.q_proj, w["q"][q_rows])
    u, s, vt = jnp.linalg.svd(jnp.concatenate([w["k"], w["v"]]), full_matrices=False)
    r = cfg.kv_lora_rank
    k_up = u[: hkv * head_dim, :r].reshape(hkv, head_dim, r)[:, :nope]
    v_up = u[hkv * head_dim:, :r].reshape(hkv, head_dim, r)
    _set(mla.kv_b_proj, jnp.concatenate([k_up, v_up], axis=1).reshape(-1, r))
    k_rope = w["k"].reshape(hkv, head_dim, -1)[:, head_dim - rope:].mean(axis=0)
    _set(mla.kv_a_proj_with_mqa, jnp.concatenate([s[:r, None] * vt[:r], k_rope]))
    _set(mla.o_proj, w["o"])


def init_mamba2(mixer: Mamba2Mixer, w: dict[str, jax.Array]) -> None:
    """MambaInLlama: in_proj's x, B, C rows <- W_V, W_K, W_Q; out_proj <- W_O; the rest fresh."""
    cfg = mixer.cfg
    xw, bw = cfg.xb_heads * cfg.head_dim, cfg.b_groups * cfg.d_state
    start = cfg.d_inner  # in_proj rows: [z (d_inner) ; x ; B ; C ; dt]
    weight = _w(mixer.in_proj)
    for rows, src in ((xw, w["v"]), (bw, w["k"]), (cfg.n_groups * cfg.d_state, w["q"])):
        if src.shape[0] != rows:
            raise ConfigError(f"Mamba2 block of {rows} rows cannot take a teacher block of {src.shape[0]}")
        weight = weight.at[start:start + rows].set(src)
        start += rows
    _set(mixer.in_proj, weight)
    _set(mixer.out_proj, w["o"])


def init_gdn(mixer: GatedDeltaNet, w: dict[str, jax.Array], heads: int, kv_heads: int) -> None:
    """KV heads repeated to the query heads; overlapping blocks of W_Q/W_K/W_V/W_O copied."""
    group = heads // kv_heads

    def repeat(x):  # [kv_heads * dh, d] -> [heads * dh, d], each KV head serving `group` heads
        return jnp.repeat(x.reshape(kv_heads, -1, x.shape[-1]), group, axis=0).reshape(-1, x.shape[-1])

    for linear, src in ((mixer.q_proj, w["q"]), (mixer.k_proj, repeat(w["k"])),
                        (mixer.v_proj, repeat(w["v"]))):
        weight = _w(linear)
        n = min(weight.shape[0], src.shape[0])
        _set(linear, weight.at[:n].set(src[:n]))
    weight = _w(mixer.o_proj)
    n = min(weight.shape[1], w["o"].shape[1])
    _set(mixer.o_proj, weight.at[:, :n].set(w["o"][:, :n]))


def _copy_module(dst: nnx.Module, src: nnx.Module) -> None:
    """Copies every parameter of `src` into the same path of `dst` (same shapes)."""
    nnx.update(dst, jax.tree.map(lambda a, b: reshard(a.astype(b.dtype), b.sharding),
                                 nnx.state(src, nnx.Param), nnx.state(dst, nnx.Param)))


def upcycle(teacher: CausalLM, spec: ModelSpec, *, seed: int = 0) -> CausalLM:
    """A student of architecture `spec` initialised from `teacher` (on the teacher's devices)."""
    t_cfg, s_cfg = teacher.cfg, spec.model
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
        if getattr(t_cfg, field) != getattr(s_cfg, field):
            raise ConfigError(f"student {field}={getattr(s_cfg, field)} differs from the teacher's "
                              f"{getattr(t_cfg, field)}")
    student = spec.build(nnx.Rngs(seed))
    t_leaf = teacher.model.embed_tokens.embedding[...]
    if not t_leaf.is_fully_addressable:  # multi-host: the student joins the teacher's mesh first
        nnx.update(student, reshard_state(nnx.state(student), t_leaf.sharding.mesh))
    _copy_module(student.model.embed_tokens, teacher.model.embed_tokens)
    _copy_module(student.model.norm, teacher.model.norm)
    if student.lm_head is not None:
        head = (teacher.lm_head.kernel[...] if teacher.lm_head is not None
                else teacher.model.embed_tokens.embedding[...].T)
        old = student.lm_head.kernel[...]
        student.lm_head.kernel[...] = reshard(head.astype(old.dtype), old.sharding)
    for i, (s_layer, t_layer) in enumerate(zip(student.model.layers, teacher.model.layers, strict=True)):
        for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
            _copy_module(getattr(s_layer, name), getattr(t_layer, name))
        mixer, w = s_layer.mixer, attention_weights(t_layer.self_attn)
        if isinstance(mixer, Attention):
            _copy_module(mixer, t_layer.self_attn)
        elif isinstance(mixer, MLA):
            init_mla(mixer, w, t_cfg.head_dim)
        elif isinstance(mixer, Mamba2Mixer):
            init_mamba2(mixer, w)
        elif isinstance(mixer, GatedDeltaNet):
            init_gdn(mixer, w, t_cfg.num_heads, t_cfg.num_kv_heads)
        log.debug("layer %d: %s initialised", i, type(mixer).__name__)
    return student
