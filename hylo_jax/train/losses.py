"""Distillation losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def forward_kl(teacher_logits: Float[Array, "b t v"], student_logits: Float[Array, "b t v"], *,
               temperature: float = 1.0, mask: Float[Array, "b t"] | None = None) -> Float[Array, ""]:
    """Mean over (masked) tokens of KL(p_teacher || p_student) at `temperature`, in fp32."""
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    if mask is None:
        return jnp.mean(kl)
    return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1)
