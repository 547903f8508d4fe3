"""The teacher: a Llama / Qwen2 / Qwen3 decoder in Flax NNX with Hugging Face-like names.

Module tree (parameter paths mirror transformers'): `model.embed_tokens`, `model.layers[i]`
with `input_layernorm`, `self_attn.{q,k,v,o}_proj` (+ `q_norm`, `k_norm` in Qwen3),
`post_attention_layernorm`, `mlp.{gate,up,down}_proj`; `model.norm`; `lm_head` (absent when tied).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name
from jaxtyping import Array, Float, Int

from hylo_jax.config import ModelConfig
from hylo_jax.kernels.attention import attention, cache_slots, cached_attention, cached_impl
from hylo_jax.models.layers import MLP, Embed, Linear, RMSNorm, dtype_of
from hylo_jax.models.rope import apply_rope, rope_cos_sin
from hylo_jax.parallel import context
from hylo_jax.sharding import check_divides, constrain, constrain_dividing

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}

ACT = ("act_batch", "act_length", "act_embed")
KV_CACHE_AXES = ("act_batch", None, "act_kv_heads", None)  # [b, slots, kv heads, head dim]


@struct.dataclass
class KVCache:
    """Preallocated keys and values of one attention layer: [batch, max_len, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
        shape = (batch, cache_slots(max_len), kv_heads, head_dim)
        zeros = lambda: constrain_dividing(jnp.zeros(shape, dtype), KV_CACHE_AXES)  # noqa: E731
        return cls(zeros(), zeros())

    def write(self, k: jax.Array, v: jax.Array, positions: Int[Array, "b t"]) -> KVCache:
        """Stores the new tokens' keys/values at their positions (one slot per position)."""
        rows = jnp.arange(k.shape[0])[:, None]
        return KVCache(self.k.at[rows, positions].set(k.astype(self.k.dtype)),
                       self.v.at[rows, positions].set(v.astype(self.v.dtype)))


def segment_positions(segment_ids: Int[Array, "b t"]) -> Int[Array, "b t"]:
    """Position of each token inside its document: t minus the start of its segment."""
    t = jnp.arange(segment_ids.shape[1])
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE (+ QKV bias for Qwen2, q/k RMSNorm for Qwen3)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(d, cfg.num_heads * hd, axes=("embed", "q_heads"),
                             use_bias=cfg.attention_bias, **kw)
        self.k_proj = Linear(d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"),
                             use_bias=cfg.attention_bias, **kw)
        self.v_proj = Linear(d, cfg.num_kv_heads * hd, axes=("embed", "kv_heads"),
                             use_bias=cfg.attention_bias, **kw)
        self.o_proj = Linear(cfg.num_heads * hd, d, axes=("q_heads", "embed"), **kw)
        if cfg.qk_norm:
            pd = dtype_of(cfg.param_dtype)
            self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=pd, axes=("head_dim",))
            self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=pd, axes=("head_dim",))
        else:
            self.q_norm = self.k_norm = None
        self.cfg = cfg

    def __call__(self, x: Float[Array, "b t d"], *, positions: Int[Array, "b t"], segment_ids=None,
                 cache: KVCache | None = None, kv_length=None
                 ) -> tuple[Float[Array, "b t d"], KVCache | None]:
        """Causal self-attention at `positions`; with a cache, new keys/values are written into it
        and the queries attend its first `kv_length` slots (decode / chunked prefill)."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_cos_sin(positions, cfg.rope, cfg.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = constrain(q, ("act_batch", "act_length", "act_heads", "act_head_dim"))
        k = constrain(k, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
        if cache is None and context.active_mesh() is not None:  # context parallel: K/V travel
            out = context.attention(q, k, v, segment_ids=segment_ids)
        elif cache is None:
            out = attention(q, k, v, segment_ids=segment_ids, impl=cfg.attention_impl, max_segments=cfg.max_segments)
        else:
            cache = cache.write(k, v, positions)
            group = cfg.num_heads // cfg.num_kv_heads
            out = cached_attention(q.reshape(b, t, cfg.num_kv_heads, group, cfg.head_dim), cache.k, cache.v,
                                   q_positions=positions, kv_length=kv_length,
                                   impl=cached_impl(cfg.attention_impl)).reshape(b, t, cfg.num_heads, -1)
        out = checkpoint_name(out, "attention_out")
        return self.o_proj(out.reshape(b, t, -1)), cache

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        cfg = self.cfg
        return KVCache.zeros(batch, max_len, cfg.num_kv_heads, cfg.head_dim, dtype_of(cfg.dtype))


# A mixer factory builds one layer's token mixer: rngs -> (attribute name, module). Every mixer has
# __call__(x, *, positions, segment_ids, cache, kv_length) -> (y, cache) and init_cache(batch, max_len).
MixerFactory = Callable[[nnx.Rngs], tuple[str, nnx.Module]]


def attention_mixer(cfg: ModelConfig) -> MixerFactory:
    """The teacher's own GQA attention, stored as `self_attn`."""
    return lambda rngs: ("self_attn", Attention(cfg, rngs=rngs))


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + mixer(norm(x)), then x + mlp(norm(x)). The mixer is the teacher's
    attention or, in a hybrid, MLA / Mamba2 / GDN, stored under its HF-like attribute name."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mixer: MixerFactory | None = None):
        pd = dtype_of(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.mixer_name, module = (mixer or attention_mixer(cfg))(rngs)
        setattr(self, self.mixer_name, module)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, rngs=rngs,
                       dtype=dtype_of(cfg.dtype), param_dtype=pd)

    @property
    def mixer(self) -> nnx.Module:
        return getattr(self, self.mixer_name)

    def __call__(self, x, positions, segment_ids=None, cache=None, kv_length=None):
        x, _, cache = self.forward(x, positions, segment_ids, cache, kv_length)
        return x, cache

    def forward(self, x, positions, segment_ids=None, cache=None, kv_length=None):
        """(layer output, mixer output before the residual, cache)."""
        mixed, cache = self.mixer(self.input_layernorm(x), positions=positions,
                                  segment_ids=segment_ids, cache=cache, kv_length=kv_length)
        h = constrain(x + mixed, ACT)
        return constrain(h + self.mlp(self.post_attention_layernorm(h)), ACT), mixed, cache


class Decoder(nnx.Module):
    """Embedding, the stack of decoder layers, final RMSNorm (HF's `model`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
                 mixers: Sequence[MixerFactory] | None = None):
        dt, pd = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        mixers = mixers or [attention_mixer(cfg)] * cfg.num_layers
        if len(mixers) != cfg.num_layers:
            raise ValueError(f"{len(mixers)} mixers for {cfg.num_layers} layers")
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=dt, param_dtype=pd)
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, mixer=m) for m in mixers])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pd)
        self.cfg = cfg

    def _forward_fn(self, training: bool):
        """DecoderLayer.forward, rematerialised per the config when training (no cache)."""
        fn = DecoderLayer.forward
        if training and self.cfg.remat != "none":
            fn = nnx.remat(fn, policy=REMAT_POLICIES[self.cfg.remat])
        return fn

    def __call__(self, tokens: Int[Array, "b t"], positions: Int[Array, "b t"], *, segment_ids=None,
                 caches=None, kv_length=None) -> tuple[Float[Array, "b t d"], list | None]:
        x = constrain(self.embed_tokens(tokens), ACT)
        forward = self._forward_fn(training=caches is None)
        new_caches = []
        for i, layer in enumerate(self.layers):
            x, _, cache = forward(layer, x, positions, segment_ids,
                                  None if caches is None else caches[i], kv_length)
            new_caches.append(cache)
        return self.norm(x), (None if caches is None else new_caches)

    def trace(self, tokens: Int[Array, "b t"], positions: Int[Array, "b t"], *, segment_ids=None
              ) -> tuple[list[jax.Array], list[jax.Array]]:
        """Every layer's input h_l (l = 0..L, h_L the last layer's output, before the final norm)
        and every mixer's output a_l: the targets of intermediate-layer distillation."""
        forward = self._forward_fn(training=True)
        hidden, mixed = [constrain(self.embed_tokens(tokens), ACT)], []
        for layer in self.layers:
            out, a, _ = forward(layer, hidden[-1], positions, segment_ids)
            hidden.append(out)
            mixed.append(a)
        return hidden, mixed

    def teacher_forced(self, inputs: Sequence[jax.Array], positions: Int[Array, "b t"], *,
                       segment_ids=None) -> tuple[list[jax.Array], list[jax.Array]]:
        """Each layer l run on the given input h_l (teacher forcing): (outputs, mixer outputs)."""
        forward = self._forward_fn(training=True)
        outs, mixed = [], []
        for layer, h in zip(self.layers, inputs, strict=True):
            out, a, _ = forward(layer, h, positions, segment_ids)
            outs.append(out)
            mixed.append(a)
        return outs, mixed


def check_mesh(cfg: ModelConfig, mesh: jax.sharding.Mesh) -> None:
    """`MeshError` unless tensor parallelism splits whole heads (query and key/value)."""
    check_divides(mesh, "model.num_heads", cfg.num_heads, ("tensor",))
    check_divides(mesh, "model.num_kv_heads", cfg.num_kv_heads, ("tensor",))


class CausalLM(nnx.Module):
    """Decoder plus LM head; logits are returned in fp32. `mixers` (one factory per layer) makes
    it a hybrid; the default is the teacher (attention everywhere)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs,
                 mixers: Sequence[MixerFactory] | None = None):
        self.model = Decoder(cfg, rngs=rngs, mixers=mixers)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs,
            dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        self.cfg = cfg

    def head_kernel(self) -> Float[Array, "d v"]:
        """The LM head as a [d, vocab] matrix (the embedding transposed when tied)."""
        if self.lm_head is None:
            return self.model.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def logits(self, hidden: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
        """LM head on final hidden states."""
        if self.lm_head is None:
            out = self.model.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return constrain(out, ("act_batch", "act_length", "act_vocab")).astype(jnp.float32)

    def hidden_states(self, tokens: Int[Array, "b t"], *, positions=None,
                      segment_ids=None) -> Float[Array, "b t d"]:
        """Final normalised hidden states; positions restart per segment when not given."""
        if positions is None:
            positions = (segment_positions(segment_ids) if segment_ids is not None
                         else jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape))
        hidden, _ = self.model(tokens, positions, segment_ids=segment_ids)
        return hidden

    def __call__(self, tokens: Int[Array, "b t"], *, positions=None,
                 segment_ids=None) -> Float[Array, "b t v"]:
        return self.logits(self.hidden_states(tokens, positions=positions, segment_ids=segment_ids))

    def init_cache(self, batch: int, max_len: int) -> list:
        """Each layer's empty decode cache (KV, MLA latent, or recurrent state)."""
        return [layer.mixer.init_cache(batch, max_len) for layer in self.model.layers]

    def forward_cached(self, tokens: Int[Array, "b t"], caches: list[KVCache],
                       positions: Int[Array, "b t"], kv_length: Int[Array, "b"]):
        """Runs new tokens at `positions` against the caches; returns (logits, caches)."""
        hidden, caches = self.model(tokens, positions, caches=caches, kv_length=kv_length)
        return self.logits(hidden), caches
