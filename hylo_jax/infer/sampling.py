"""Next-token choice: greedy, or temperature sampling with top-k / top-p filtering."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
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
