"""Prompt -> continuation with a preallocated KV cache: one prefill, then a jitted decode loop.

Prompts of different lengths are right-padded; each row writes its next token at its own
position, so padding slots are overwritten before they are ever attended.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from hylo_jax.config import doc


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token."""

    max_new_tokens: int = doc(64, "Tokens to generate per prompt (at most).")
    temperature: float = doc(0.0, "Softmax temperature; 0 = greedy.")
    top_k: int = doc(0, "Keep the k most likely tokens (0 = all).")
    top_p: float = doc(1.0, "Keep the smallest set of tokens with this total probability.")
    seed: int = doc(0, "Sampling seed.")


def sample(logits: Float[Array, "b v"], key: jax.Array, cfg: SamplingConfig) -> Int[Array, "b"]:
    """Greedy when temperature is 0, else top-k / top-p filtered sampling at the temperature."""
    if cfg.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if cfg.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        # keep a token if the mass before it is below top_p (the first token is always kept)
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < cfg.top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
             stop_tokens: Sequence[int] = ()) -> list[list[int]]:
    """Continuations of each prompt (stop tokens excluded), greedy or sampled."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    lengths = np.array([len(p) for p in prompts], np.int32)
    width = int(lengths.max())
    recurrent = [type(layer.mixer).__name__ for layer in model.model.layers
                 if layer.mixer_name == "linear_attn"]
    if recurrent and len(set(lengths.tolist())) > 1:
        raise ValueError(f"prompts of different lengths need per-row state masking, which the {recurrent[0]} "
                         "layers' recurrent caches do not do here; generate them one at a time (or in "
                         "batches of equal length)")
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    max_len = width + cfg.max_new_tokens
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths),
                    jnp.asarray(list(stop_tokens) or [-1], jnp.int32), cfg, max_len)
    result = []
    for row in np.asarray(out):
        row = list(row)
        ends = [i for i, t in enumerate(row) if t in set(stop_tokens) or t < 0]
        result.append(row[: ends[0]] if ends else row)
    return result


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg", "max_len"))
def _generate(graphdef, state, tokens, lengths, stop, cfg: SamplingConfig, max_len: int):
    model = nnx.merge(graphdef, state)
    b, width = tokens.shape
    caches = model.init_cache(b, max_len)
    positions = jnp.broadcast_to(jnp.arange(width), (b, width))
    logits, caches = model.forward_cached(tokens, caches, positions, jnp.full((b,), width))
    last_logits = logits[jnp.arange(b), lengths - 1]
    key = jax.random.key(cfg.seed)
    out = jnp.full((b, cfg.max_new_tokens), -1, jnp.int32)

    def body(carry):
        step, caches, last_logits, pos, done, out, key = carry
        key, sub = jax.random.split(key)
        token = sample(last_logits, sub, cfg)
        token = jnp.where(done, -1, token)
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, stop)
        logits, caches = model.forward_cached(jnp.maximum(token, 0)[:, None], caches, pos[:, None],
                                              pos + 1)
        return step + 1, caches, logits[:, 0], pos + 1, done, out, key

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < cfg.max_new_tokens) & ~jnp.all(done)

    carry = (0, caches, last_logits, lengths, jnp.zeros((b,), bool), out, key)
    return jax.lax.while_loop(cond, body, carry)[5]
