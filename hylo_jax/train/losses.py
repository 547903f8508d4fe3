"""Distillation losses: forward KL (dense and logit-free chunked), cross-entropy, and ILD.

The chunked KD never materialises [T, vocab] logits: teacher and student final hidden states are
projected by their LM heads one chunk of tokens at a time, and each chunk's gradient is formed in the
same pass, so nothing of size vocab is stored or recomputed (memory O(chunk x vocab)).
"""

from __future__ import annotations

import functools
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
    return _kl_of(log_p, log_q)


def _kl_of(log_p, log_q):
    """sum_v p (log p - log q) from log-probabilities."""
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def token_nll(student_logits: Float[Array, "b t v"], targets: Int[Array, "b t"]) -> Float[Array, "b t"]:
    """-log p(target) per token (fp32)."""
    return _nll_of(jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1), targets)


def _nll_of(log_q, targets):
    """-log q(target) from log-probabilities."""
    return -jnp.take_along_axis(log_q, targets[..., None], axis=-1)[..., 0]


def chunked_kd(h_teacher: Float[Array, "b t dt"], head_teacher: Float[Array, "dt v"],
               h_student: Float[Array, "b t ds"], head_student: Float[Array, "ds v"],
               targets: Int[Array, "b t"], mask: Float[Array, "b t"], *, chunk: int,
               temperature: float = 1.0, ce_weight: float = 0.0
               ) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
    """(kl + ce_weight ce, kl, ce): kl the mean KL(teacher || student), ce the mean student cross-entropy
    over masked tokens, computed in token chunks of `chunk` (T need not divide).

    Only the first output carries a gradient (kl and ce are for logging), and only into the student's
    hidden states and head. Each chunk's d loss / d logits is formed while its softmaxes are at hand,
    dl = m / count ((q_T - p_T) / T + ce_weight (q_1 - onehot(target))), and projected right away
    (d h = dl W^T, d W += h^T dl, dl in the student's compute dtype as autodiff's bf16 matmuls would
    take it), so the backward only scales them by the cotangent: four LM-head matmuls per chunk
    (teacher and student logits, the two projections), where a rematerialised scan takes six."""
    loss, kl, ce = _chunked_kd(h_teacher, head_teacher, h_student, head_student, targets,
                               mask.astype(jnp.float32), chunk, temperature, ce_weight)
    return loss, jax.lax.stop_gradient(kl), jax.lax.stop_gradient(ce)


def _kd_pass(h_teacher, head_teacher, h_student, head_student, targets, mask, chunk: int, temperature: float,
             ce_weight: float):
    """((loss, kl, ce), (d loss / d h_student, d loss / d head_student)), one chunk of tokens at a time."""
    b, t, _ = h_student.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    dtype = h_student.dtype
    w_teacher, w_student = head_teacher.astype(h_teacher.dtype), head_student.astype(dtype)
    count = jnp.maximum(jnp.sum(mask), 1)

    def chunks(x):  # [b, t, ...] -> [n, b, chunk, ...], padded with zeros (mask 0)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    def body(carry, xs):
        kl_sum, ce_sum, d_head = carry
        ht, hs, tgt, m = xs
        log_p = jax.nn.log_softmax(jnp.dot(ht, w_teacher, preferred_element_type=jnp.float32) / temperature)
        logits = jnp.dot(hs, w_student, preferred_element_type=jnp.float32)
        log_q = jax.nn.log_softmax(logits / temperature)
        log_q1 = log_q if temperature == 1.0 else jax.nn.log_softmax(logits)
        kl, ce = _kl_of(log_p, log_q), _nll_of(log_q1, tgt)
        d_logits = (jnp.exp(log_q) - jnp.exp(log_p)) / temperature
        if ce_weight:
            onehot = jnp.arange(logits.shape[-1]) == tgt[..., None]
            d_logits = d_logits + ce_weight * (jnp.exp(log_q1) - onehot)
        d_logits = (d_logits * (m / count)[..., None]).astype(dtype)
        d_hs = jnp.dot(d_logits, w_student.T, preferred_element_type=jnp.float32).astype(dtype)
        d_head = d_head + jnp.einsum("btd,btv->dv", hs, d_logits, preferred_element_type=jnp.float32)
        return (kl_sum + jnp.sum(kl * m), ce_sum + jnp.sum(ce * m), d_head), d_hs

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jnp.zeros(head_student.shape, jnp.float32))
    (kl, ce, d_head), d_hs = jax.lax.scan(body, init, tuple(map(chunks, (h_teacher, h_student, targets, mask))))
    d_hs = jnp.moveaxis(d_hs, 0, 1).reshape(b, n * chunk, -1)[:, :t]
    kl, ce = kl / count, ce / count
    return (kl + ce_weight * ce, kl, ce), (d_hs, d_head.astype(head_student.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _chunked_kd(h_teacher, head_teacher, h_student, head_student, targets, mask, chunk, temperature, ce_weight):
    return _kd_pass(h_teacher, head_teacher, h_student, head_student, targets, mask, chunk, temperature,
                    ce_weight)[0]


def _chunked_kd_fwd(h_teacher, head_teacher, h_student, head_student, targets, mask, chunk, temperature,
                    ce_weight):
    return _kd_pass(h_teacher, head_teacher, h_student, head_student, targets, mask, chunk, temperature, ce_weight)


def _chunked_kd_bwd(chunk, temperature, ce_weight, grads, cotangents):
    """Only the student side has a gradient (None: zero for the teacher's states and head, targets, mask)."""
    d_hs, d_head = grads
    g = cotangents[0]  # kl and ce leave `chunked_kd` through stop_gradient: their cotangents are zero
    return None, None, (g * d_hs).astype(d_hs.dtype), g * d_head, None, None


_chunked_kd.defvjp(_chunked_kd_fwd, _chunked_kd_bwd)


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
