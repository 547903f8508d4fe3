"""Distillation losses: forward KL (dense and logit-free chunked), cross-entropy, and ILD.

The chunked KD never materialises [T, vocab] logits: teacher and student final hidden states are
projected by their LM heads one chunk of tokens at a time inside a rematerialised scan, so the
backward pass recomputes each chunk's logits instead of storing them (memory O(chunk x vocab)).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def forward_kl(teacher_logits: Float[Array, "b t v"], student_logits: Float[Array, "b t v"], *,
               temperature: float = 1.0, mask: Float[Array, "b t"] | None = None) -> Float[Array, ""]:
    """Mean over (masked) tokens of KL(p_teacher || p_student) at `temperature`, in fp32."""
    kl = _token_kl(teacher_logits, student_logits, temperature)
    if mask is None:
        return jnp.mean(kl)
    return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1)


def _token_kl(teacher_logits, student_logits, temperature: float):
    """KL(p_t || p_s) per token (fp32), summed over the vocabulary."""
    log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def token_nll(student_logits: Float[Array, "b t v"], targets: Int[Array, "b t"]) -> Float[Array, "b t"]:
    """-log p(target) per token (fp32)."""
    logp = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def chunked_kd(h_teacher: Float[Array, "b t dt"], head_teacher: Float[Array, "dt v"],
               h_student: Float[Array, "b t ds"], head_student: Float[Array, "ds v"],
               targets: Int[Array, "b t"], mask: Float[Array, "b t"], *, chunk: int,
               temperature: float = 1.0) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(mean KL(teacher || student), mean student cross-entropy) over masked tokens, computed in
    token chunks of `chunk` with the LM heads inside a rematerialised scan. T need not divide."""
    b, t, _ = h_student.shape
    n = -(-t // chunk)
    pad = n * chunk - t

    def chunks(x):  # [b, t, ...] -> [n, b, chunk, ...], padded with zeros (mask 0)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(ht, hs, tgt, m):
        lt = jnp.dot(ht, head_teacher.astype(ht.dtype), preferred_element_type=jnp.float32)
        ls = jnp.dot(hs, head_student.astype(hs.dtype), preferred_element_type=jnp.float32)
        return jnp.sum(_token_kl(lt, ls, temperature) * m), jnp.sum(token_nll(ls, tgt) * m)

    def body(acc, xs):
        kl, ce = one(*xs)
        return (acc[0] + kl, acc[1] + ce), None

    zero = jnp.zeros((), jnp.float32)
    m = mask.astype(jnp.float32)
    (kl, ce), _ = jax.lax.scan(body, (zero, zero), tuple(map(chunks, (h_teacher, h_student, targets, m))))
    count = jnp.maximum(jnp.sum(m), 1)
    return kl / count, ce / count


def ild_loss(student_out: Sequence[jax.Array], teacher_out: Sequence[jax.Array],
             student_mixed: Sequence[jax.Array], teacher_mixed: Sequence[jax.Array],
             mask: Float[Array, "b t"], *, squared: bool = False) -> Float[Array, ""]:
    """Intermediate-layer distillation: sum over layers of the masked token mean of
    ||h_s - h_t||_2 + ||a_s - a_t||_2 (layer outputs h and mixer outputs a), or their squares."""
    m = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(m), 1)

    def distance(a, b):
        sq = jnp.sum(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=-1)
        # sqrt has an infinite gradient at 0: guard so identical layers give a zero gradient
        d = sq if squared else jnp.sqrt(jnp.where(sq > 0, sq, 1.0)) * (sq > 0)
        return jnp.sum(d * m) / count

    return sum(distance(hs, ht) + distance(as_, at) for hs, ht, as_, at in
               zip(student_out, teacher_out, student_mixed, teacher_mixed, strict=True))
