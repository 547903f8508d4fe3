"""Gated delta rule (Gated DeltaNet, Yang et al., ICLR 2025) as pure JAX functions.

Per batch element and head, with state S of shape [dk, dv], log-decay g_t <= 0 and step size beta_t:

    S'_t = exp(g_t) S_{t-1}                                  (decay)
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T            (delta-rule write)
         = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t  = S_t^T (scale q_t),    scale = 1/sqrt(dk) by default

This is the convention of `torch_recurrent_gated_delta_rule` / `torch_chunk_gated_delta_rule` in
transformers' qwen3_next (and of fla's `chunk_gated_delta_rule`), including the optional L2 normalisation of
q and k, x / sqrt(sum x^2 + 1e-6), applied before scaling.

Layout is [batch, time, heads, dim]; the maths is fp32 (the Pallas path multiplies operands in the layer's
dtype, bf16 for bf16 layers, with fp32 accumulation), outputs are cast to v.dtype and states are fp32.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from . import mosaic_common, mosaic_gdn, mosaic_gdn_factors, pallas_common, pallas_gdn

_L2NORM_EPS = 1e-6


def _l2norm(x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    """x / sqrt(sum(x^2) + eps) over the last axis (the fla / transformers convention)."""
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + _L2NORM_EPS)


def _prepare_qk(q: Array, k: Array, scale: float | None, use_qk_l2norm: bool) -> tuple[Array, Array]:
    """Cast q, k to fp32, optionally L2-normalise them, and fold the scale (default 1/sqrt(dk)) into q."""
    q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return (q if scale == 1.0 else q * scale), k


def _check_shapes(specs: dict[str, tuple[tuple[int, ...], tuple[str, ...]]]) -> None:
    """Check that every array has the rank of its spec and that each named dimension has one size throughout."""
    sizes: dict[str, tuple[int, str]] = {}
    for name, (shape, dims) in specs.items():
        if len(shape) != len(dims):
            raise ValueError(f"{name} must have rank {len(dims)} [{', '.join(dims)}], got shape {shape}")
        for dim, size in zip(dims, shape):
            if dim not in sizes:
                sizes[dim] = (size, name)
            elif sizes[dim][0] != size:
                first_size, first_name = sizes[dim]
                raise ValueError(
                    f"dimension '{dim}' mismatch: {first_name} has {dim}={first_size} but {name} has {dim}={size}"
                    f" (shape {shape}, expected [{', '.join(dims)}])"
                )


def unit_lower_inverse(m: Float[Array, "... c c"]) -> Float[Array, "... c c"]:
    """(I + tril(m, -1))^{-1} for a power-of-two c, by recursive block inversion in log2(c) levels.

    Each level doubles the inverted diagonal blocks: [[A, 0], [C, D]]^{-1} = [[A^-1, 0], [-D^-1 C A^-1, D^-1]].
    That is the recursive form of triangular inversion; every level is two batched matmuls, instead of c
    sequential row updates over the whole right-hand side (and no LAPACK trsm, whose CPU thread pool can
    deadlock when several solves run at once).
    """
    c = m.shape[-1]
    lead = m.shape[:-2]
    lower = jnp.tril(m, -1)
    inv = jnp.ones((*lead, c, 1, 1), m.dtype)  # inverses of the 1x1 diagonal blocks
    s = 1
    while s < c:
        nb = c // (2 * s)
        blocks = lower.reshape(*lead, nb, 2 * s, nb, 2 * s)
        below = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)[..., s:, :s]  # C, [.., nb, s, s]
        pairs = inv.reshape(*lead, nb, 2, s, s)
        a_inv, d_inv = pairs[..., 0, :, :], pairs[..., 1, :, :]
        off = -jnp.einsum("...ij,...jk,...kl->...il", d_inv, below, a_inv)
        top = jnp.concatenate([a_inv, jnp.zeros_like(a_inv)], axis=-1)
        inv = jnp.concatenate([top, jnp.concatenate([off, d_inv], axis=-1)], axis=-2)
        s *= 2
    return inv.reshape(*lead, c, c)


def _lowp(spec: str, a: Array, b: Array, dtype: Any, out: Any = jnp.float32) -> Array:
    """einsum(spec, a, b) with operands rounded to `dtype`, accumulated in fp32 and returned in `out` (a
    narrower `out` is the matmul's own output type: no fp32 array in between)."""
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def matmul(spec: str, a: Array, b: Array, dtype: Any = jnp.float32, out: Any = jnp.float32) -> Array:
    """`_lowp` whose VJP multiplies in `dtype` too (the cotangent rounded to it, fp32 accumulation), as
    fla's bf16 kernels do; plain autodiff would multiply an fp32 cotangent by the widened operand. Every
    index of each operand must appear in the output or in the other operand (no lone sums)."""
    return _lowp(spec, a, b, dtype, out)


def _matmul_fwd(spec, a, b, dtype, out):
    return _lowp(spec, a, b, dtype, out), (a, b)


def _matmul_bwd(spec, dtype, _, res, g):
    a, b = res
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    return _lowp(f"{out},{sb}->{sa}", g, b, dtype, a.dtype), _lowp(f"{out},{sa}->{sb}", g, a, dtype, b.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _inverse_cotangent(t: Float[Array, "... c c"], t_bar: Float[Array, "... c c"]) -> Float[Array, "... c c"]:
    """m_bar for T = (I + tril(m, -1))^{-1}: dT = -T dL T, so m_bar = -tril(T^T T_bar T^T, -1)."""
    return -jnp.tril(jnp.einsum("...ji,...jk,...lk->...il", t, t_bar, t, precision=lax.Precision.HIGHEST), -1)


@jax.custom_vjp
def lower_inverse(m: Float[Array, "... c c"]) -> Float[Array, "... c c"]:
    """T = (I + tril(m, -1))^{-1} (`unit_lower_inverse`; only m's strictly lower triangle is read), with the
    VJP of `_inverse_cotangent` (three small matmuls instead of autodiff through the doublings)."""
    return unit_lower_inverse(m)


def _lower_inverse_fwd(m):
    t = unit_lower_inverse(m)
    return t, t


lower_inverse.defvjp(_lower_inverse_fwd, lambda t, t_bar: (_inverse_cotangent(t, t_bar),))


def _masked_exp(x: Array, mask: Array) -> Array:
    """exp(x) where mask else exactly 0; masked before exp so neither values nor gradients see inf."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def _chunk_masks(cum: Float[Array, "b h n c"], seg: Int[Array, "b 1 n c"] | None) -> tuple[Array, Array, Array]:
    """(G_i - G_j, j <= i in one segment, j < i in one segment) for every chunk, [b, h, n, C, C] (seg None: one
    segment)."""
    c = cum.shape[-1]
    causal = jnp.tril(jnp.ones((c, c), dtype=bool))
    strict = causal & ~jnp.eye(c, dtype=bool)
    if seg is not None:
        same = seg[..., :, None] == seg[..., None, :]
        causal, strict = causal & same, strict & same
    return cum[..., :, None] - cum[..., None, :], causal, strict


def chunk_inverse(
    k: Float[Array, "b h n c dk"],
    beta: Float[Array, "b h n c"],
    cum: Float[Array, "b h n c"],
    seg: Int[Array, "b 1 n c"] | None,
    dtype: Any = jnp.float32,
    inverse: Callable[[Array], Array] = lower_inverse,
) -> Float[Array, "b h n c c"]:
    """The UT transform of `_chunked`, every chunk at once: with G = `cum` (the chunk-local cumulative log-decay),
    `seg` the segment index within the chunk (None: no resets) and E_ij = e^{G_i - G_j} for j <= i in one segment,

        T = (I + M)^{-1},  M_ij = beta_i (k_i . k_j) E_ij  (j < i).

    k k^T takes operands in `dtype` (fp32 accumulation); T is fp32."""
    diff, _, strict = _chunk_masks(cum, seg)
    return inverse(beta[..., :, None] * matmul("bhnik,bhnjk->bhnij", k, k, dtype) * _masked_exp(diff, strict))


def chunk_attn(
    q: Float[Array, "b h n c dk"],
    k: Float[Array, "b h n c dk"],
    cum: Float[Array, "b h n c"],
    seg: Int[Array, "b 1 n c"] | None,
    dtype: Any = jnp.float32,
) -> Float[Array, "b h n c c"]:
    """The chunks' own output weights attn = (q k^T) o E (`chunk_inverse`'s E), fp32, operands in `dtype`."""
    diff, causal, _ = _chunk_masks(cum, seg)
    return matmul("bhnik,bhnjk->bhnij", q, k, dtype) * _masked_exp(diff, causal)


def _delta_step(
    state: Float[Array, "b h dk dv"],
    q_t: Float[Array, "b h dk"],
    k_t: Float[Array, "b h dk"],
    v_t: Float[Array, "b h dv"],
    g_t: Float[Array, "b h"],
    beta_t: Float[Array, "b h"],
) -> tuple[Float[Array, "b h dv"], Float[Array, "b h dk dv"]]:
    """One recurrence step on prepared fp32 inputs (q already scaled): S' = e^g S; S = S' + k beta (v - S'^T k)^T."""
    state = jnp.exp(g_t)[..., None, None] * state
    delta = beta_t[..., None] * (v_t - jnp.einsum("bhkv,bhk->bhv", state, k_t))
    state = state + k_t[..., :, None] * delta[..., None, :]
    return jnp.einsum("bhkv,bhk->bhv", state, q_t), state


def _reference(
    q: Float[Array, "b t h dk"],
    k: Float[Array, "b t h dk"],
    v: Float[Array, "b t h dv"],
    g: Float[Array, "b t h"],
    beta: Float[Array, "b t h"],
    state: Float[Array, "b h dk dv"],
    reset: Bool[Array, "b t"] | None,
    chunk_size: int,
) -> tuple[Float[Array, "b t h dv"], Float[Array, "b h dk dv"]]:
    """Token-by-token `lax.scan` of the recurrence (the oracle); the state is zeroed before every reset token
    (reset None: none)."""
    del chunk_size
    reset = jnp.zeros(q.shape[:2], bool) if reset is None else reset

    def step(s, xs):
        q_t, k_t, v_t, g_t, beta_t, reset_t = xs
        s = jnp.where(reset_t[:, None, None, None], 0.0, s)
        o_t, s = _delta_step(s, q_t, k_t, v_t, g_t, beta_t)
        return s, o_t

    state, o = lax.scan(step, state, tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta, reset)))
    return jnp.moveaxis(o, 0, 1), state


def make_recurrence(forward: Callable, backward: Callable) -> Callable:
    """The chunk-state recurrence, the only sequential part of the chunked rule, over chunks c = 0..n-1:

        delta_c = u_c - w_c S_c,      S_{c+1} = d_c S_c + k_c^T delta_c

    as `f(u [b,h,n,C,dv], w [b,h,n,C,dk], k [b,h,n,C,dk], decay [b,h,n], S_0 [b,h,dk,dv])
    -> (S_c entering every chunk [b,h,n,dk,dv], delta_c [b,h,n,C,dv], S_n)`, differentiable (chunk
    axis third: the Pallas kernels read [b*h, n*C, d] rows of it by a free reshape). `forward` runs it;
    `backward` runs the reverse recurrence of the cotangents: with G_{c+1} the whole cotangent of S_{c+1} (G_n the final
    state's) and D_c that of delta_c,

        D_c = delta_bar_c + k_c G_{c+1},      G_c = S_bar_c + d_c G_{c+1} - w_c^T D_c

    returning (G_0, G_{c+1} per chunk, D_c per chunk). Both are two small matmuls per step; the gradients
    u_bar = D, w_bar = -D S^T, k_bar = delta G^T, d_bar = <S_c, G_{c+1}> only read the sequences, so they
    run afterwards as batched matmuls over all chunks (as do the outputs in `_chunked`)."""

    @jax.custom_vjp
    def recurrence(u, w, k, decay, state):
        return forward(u, w, k, decay, state)

    def fwd(u, w, k, decay, state):
        states, deltas, final = forward(u, w, k, decay, state)
        return (states, deltas, final), (w, k, decay, states, deltas)

    def bwd(res, cotangents):
        w, k, decay, states, deltas = res
        g0, g_next, d_deltas = backward(w, k, decay, *cotangents)
        w_bar, k_bar, decay_bar = _recurrence_grads(d_deltas, deltas, states, g_next)
        return d_deltas, w_bar.astype(w.dtype), k_bar.astype(k.dtype), decay_bar, g0

    recurrence.defvjp(fwd, bwd)
    return recurrence


def _by_states(spec: str, x: Array, per_chunk: Array) -> Float[Array, "..."]:
    """einsum(spec, x, per_chunk) with x rounded to the [dk, dv] per-chunk array's dtype (the kernels store states
    and their cotangents in the operand dtype; rounding the [C, .] factor, as fla's bf16 kernels do, instead of
    widening the [dk, dv] one keeps a widened copy of it from crossing HBM), fp32 accumulation."""
    return jnp.einsum(spec, x.astype(per_chunk.dtype), per_chunk, preferred_element_type=jnp.float32)


def _recurrence_grads(d_deltas, deltas, states, g_next) -> tuple[Array, Array, Array]:
    """The recurrence's gradients that only read its sequences: w_bar = -D S^T, k_bar = delta G^T,
    d_bar = <S_c, G_{c+1}> (`make_recurrence`)."""
    return (-_by_states("bhniv,bhnkv->bhnik", d_deltas, states), _by_states("bhniv,bhnkv->bhnik", deltas, g_next),
            jnp.einsum("bhnkv,bhnkv->bhn", states, g_next, preferred_element_type=jnp.float32))


def _chunks_first(*xs):
    """[b, h, n, ...] -> [n, b, h, ...] (lax.scan runs over the leading axis)."""
    return tuple(jnp.moveaxis(x, 2, 0) for x in xs)


def _chunks_third(*xs):
    return tuple(jnp.moveaxis(x, 0, 2) for x in xs)


def _scan_forward(u, w, k, decay, state):
    def step(s, xs):
        u_c, w_c, k_c, d_c = xs
        delta = u_c - jnp.einsum("bhik,bhkv->bhiv", w_c, s)
        return d_c[..., None, None] * s + jnp.einsum("bhik,bhiv->bhkv", k_c, delta), (s, delta)

    final, (states, deltas) = lax.scan(step, state, _chunks_first(u, w, k, decay))
    return *_chunks_third(states, deltas), final


def _scan_backward(w, k, decay, states_bar, deltas_bar, final_bar):
    def step(g, xs):
        w_c, k_c, d_c, s_bar, delta_bar = xs
        d_delta = delta_bar + jnp.einsum("bhik,bhkv->bhiv", k_c, g)
        g_prev = s_bar + d_c[..., None, None] * g - jnp.einsum("bhik,bhiv->bhkv", w_c, d_delta)
        return g_prev, (g, d_delta)

    g0, (g_next, d_deltas) = lax.scan(step, final_bar, _chunks_first(w, k, decay, states_bar, deltas_bar),
                                      reverse=True)
    return g0, *_chunks_third(g_next, d_deltas)


chunk_state_recurrence = make_recurrence(_scan_forward, _scan_backward)  # `lax.scan` over the chunks


@dataclasses.dataclass(frozen=True)
class ChunkKernels:
    """What runs the parts of `_chunked`: `recurrence` (`make_recurrence`'s contract) and, on Mosaic GPU, `outputs`
    (the passes of `mosaic_gdn.Kernels`, which run the recurrence with the outputs, `_fused`, and apply q's scale
    themselves) and `factor`
    ((k [b, n*C, h, dk], beta, G, seg, save_t) -> (Ag = T diag(beta) in the operand dtype, T fp32 if save_t):
    `mosaic_gdn_factors.chunk_factor`; None: XLA's `chunk_inverse`)."""

    recurrence: Callable = chunk_state_recurrence
    factor: Callable | None = None
    outputs: mosaic_gdn.Kernels | None = None


@functools.cache
def pallas_kernels(backend: str, interpret: Any, dtype: Any, dk: int, chunk: int, scale: float) -> ChunkKernels:
    """The Pallas kernels of `pallas_gdn` ("gpu": Triton, "tpu"; the recurrence) or of `mosaic_gdn` and
    `mosaic_gdn_factors` ("mosaic_gpu": the recurrence with the outputs for the queries scale * q, and the UT
    transform's inverse where that kernel takes the shape), matmul operands in `dtype`, run per device under a set
    mesh."""
    if backend != "mosaic_gpu":
        return ChunkKernels(_per_device(make_recurrence(*pallas_gdn.scans(backend, interpret, dtype)), "sssct", "sst"))
    factor = None
    if not mosaic_gdn_factors.unsupported(dk, chunk, mosaic_common.device_dtype(dtype, interpret)):
        def factor(k, beta, cum, seg, save_t):
            run = functools.partial(mosaic_gdn_factors.chunk_factor, save_t=save_t, interpret=interpret)
            return _per_device(run, "oggm", "ss"[:1 + save_t])(k, beta, cum, seg)
    passes = mosaic_gdn.kernels(dtype, interpret, scale=scale)
    return ChunkKernels(factor=factor, outputs=mosaic_gdn.Kernels(
        _per_device(passes.forward, "sooogbt", "ot"), _per_device(passes.forward_saving, "sooogbt", "otss"),
        _per_device(passes.reverse, "soogbot", "tss"), _per_device(passes.gradients, "ssoss", "sssc"),
        _per_device(passes.values, "sooss", "sso"), _per_device(passes.keys, "oosggbsssss", "oo" + "g" * 7)))


def _unsupported(driver: str, dtype: Any, dk: int, dv: int, chunk: int) -> str | None:
    if driver == "mosaic_gpu":
        return mosaic_gdn.unsupported(dk, dv, chunk, dtype)
    return pallas_gdn.unsupported(driver, dk, dv, chunk)


def _per_device(fn: Callable, ins: str, outs: str) -> Callable:
    """`fn` per device under a set mesh (`pallas_common.on_mesh`). `ins` and `outs` give each argument's and
    result's layout: "s" [b, h, n, ., .] (per chunk), "c" [b, h, n], "g" [b, h, n, C], "t" [b, h, dk, dv],
    "o" [b, n*C, h, d], "b" [b, n*C], "m" [b, 1, n, C]."""

    def specs(rows, heads):
        layout = {"s": P(rows, heads, None, None, None), "c": P(rows, heads, None), "g": P(rows, heads, None, None),
                  "t": P(rows, heads, None, None), "o": P(rows, None, heads, None), "b": P(rows, None),
                  "m": P(rows, None, None, None)}
        return tuple(layout[x] for x in ins), tuple(layout[x] for x in outs)

    def call(*args):
        heads = args[0].shape[2 if ins[0] == "o" else 1]
        return pallas_common.on_mesh(fn, specs, args[0].shape[0], heads)(*args)

    return call


def _gate_decays(cum: Float[Array, "b h n c"], seg: Int[Array, "b 1 n c"] | None) -> tuple[Array, Array]:
    """(d_in, d_out): e^{G_i} while still in the segment the carried state belongs to, e^{G_C - G_j} in the
    chunk's last segment (exact zeros elsewhere; seg None: one segment)."""
    if seg is None:
        return jnp.exp(cum), jnp.exp(cum[..., -1:] - cum)
    return _masked_exp(cum, seg == 0), _masked_exp(cum[..., -1:] - cum, seg == seg[..., -1:])


def _recurrence_inputs(ag, v, k, q, cum, seg, dtype: Any, uw: Any):
    """What the chunk-state recurrence and the outputs take (`_chunked`), from Ag = T diag(beta) [b, h, n, C, C]
    and v, k, q in the chunk layout: u = Ag v, w = (Ag diag(d_in)) k (both in `uw`), the keys decayed to the
    chunk's end d_out o k, each chunk's decay d_c = d_in[C] and the queries decayed from its start d_in o q."""
    decay_in, decay_out = _gate_decays(cum, seg)
    u = matmul("bhnij,bhnjv->bhniv", ag, v, dtype, uw)
    w = matmul("bhnij,bhnjk->bhnik", ag * decay_in[..., None, :], k, dtype, uw)
    return u, w, decay_out[..., None] * k, decay_in[..., -1], decay_in[..., None] * q


@functools.cache
def _outputs(recurrence: Callable, dtype: Any) -> Callable:
    """(o [b, n*C, h, dv] in `dtype`, final state) = f(u, w, k, decay, state, q, attn): the chunk-state
    recurrence, then o = q S_c + attn delta_c as two batched matmuls."""

    def two_step(u, w, k, decay, state, q, attn):
        states, deltas, final = recurrence(u, w, k, decay, state)
        o = matmul("bhnik,bhnkv->bhniv", q, states, dtype) + matmul("bhnij,bhnjv->bhniv", attn, deltas, dtype)
        b, h, n, c, dv = o.shape
        return jnp.moveaxis(o.reshape(b, h, n * c, dv), 1, 2).astype(dtype), final

    return two_step


def _in_chunks(x: Float[Array, "b t h d"], chunk: int) -> Float[Array, "b h n c d"]:
    """[b, n*C, h, ...] -> [b, h, n, C, ...]."""
    b, t, h = x.shape[:3]
    return jnp.moveaxis(x.reshape(b, t // chunk, chunk, h, *x.shape[3:]), 3, 1)


@functools.cache
def _fused(passes: mosaic_gdn.Kernels, factor: Callable | None, dtype: Any, zero_start: bool) -> Callable:
    """(o [b, n*C, h, dv] in `dtype`, final state) = f(q, k, v [b, n*C, h, .], beta, G [b, h, n, C], seg, state) (state
    None if `zero_start`: the passes start from zeros, none materialised or loaded): the
    chunked op on the kernels of `mosaic_gdn` from Ag = T diag(beta) (`factor`, else XLA's `chunk_inverse`): the
    forward alone where nothing differentiates, else the factor saving T and the forward saving S_c and delta_c.
    Backward: a reverse pass from o's cotangent (the cotangents of S_c and delta_c are never formed), a pass for
    the gradients that read the states (of w, the decayed keys and queries), one for those that read the values
    (of attn and Ag, and v's) and one for the chunk-local rest (`mosaic_gdn_keys`: what the VJP of T diag(beta),
    `_recurrence_inputs`' w, keys and queries and `chunk_attn` would give), then the gates' own VJP in XLA. No
    pass reads u, w or attn: they form what they need from Ag, q and k."""

    def kernel_segments(seg):  # [b, 1, n, C] -> [b, n*C] fp32 (None: no resets, none formed or read)
        return None if seg is None else seg[:, 0].reshape(seg.shape[0], -1).astype(jnp.float32)

    def factors(k, beta, cum, seg, save_t: bool):
        if factor is not None:
            return factor(k, beta, cum, seg, save_t)
        t = chunk_inverse(_in_chunks(k, cum.shape[-1]), beta, cum, seg, dtype)
        return ((t * beta[..., None, :]).astype(dtype), t)[:1 + save_t]

    @jax.custom_vjp
    def fused(q, k, v, beta, cum, seg, state):
        (ag,) = factors(k, beta, cum, seg, save_t=False)
        return passes.forward(ag, v, k, q, cum, kernel_segments(seg), state)

    def fwd(q, k, v, beta, cum, seg, state):
        ag, t = factors(k, beta, cum, seg, save_t=True)
        o, final, states, deltas = passes.forward_saving(ag, v, k, q, cum, kernel_segments(seg), state)
        return (o, final), (q, k, v, beta, cum, seg, ag, t, states, deltas)

    def bwd(res, cotangents):
        q, k, v, beta, cum, seg, ag, t, states, deltas = res
        o_bar, final_bar = cotangents
        g0, g_next, d_deltas = passes.reverse(ag, k, q, cum, kernel_segments(seg), o_bar, final_bar)
        q_bar, w_bar, k_bar, decay_bar = passes.gradients(states, g_next, o_bar, deltas, d_deltas)
        attn_bar, ag_bar, v_bar = passes.values(ag, v, o_bar, deltas, d_deltas)
        dq, dk, gate_rows, gate_cols, beta_rows, beta_cols, d_in_rows, d_in_cols, d_out = passes.keys(
            q, k, t, beta, cum, kernel_segments(seg), q_bar, w_bar, k_bar, attn_bar, ag_bar)
        _, gates_vjp = jax.vjp(lambda cum: _gate_decays(cum, seg), cum)
        (cum_bar,) = gates_vjp(((d_in_rows + d_in_cols).at[..., -1].add(decay_bar), d_out))
        return dq, dk, v_bar, beta_rows + beta_cols, cum_bar + gate_rows + gate_cols, None, None if zero_start else g0

    fused.defvjp(fwd, bwd)
    return fused


def _chunked(
    q: Float[Array, "b t h dk"],
    k: Float[Array, "b t h dk"],
    v: Float[Array, "b t h dv"],
    g: Float[Array, "b t h"],
    beta: Float[Array, "b t h"],
    state: Float[Array, "b h dk dv"] | None,
    reset: Bool[Array, "b t"] | None,
    chunk_size: int,
    dtype: Any = jnp.float32,
    kernels: ChunkKernels = ChunkKernels(),
) -> tuple[Float[Array, "b t h dv"], Float[Array, "b h dk dv"]]:
    """Chunkwise WY / UT-transform form of the recurrence. Its matmuls take operands in `dtype` (fp32
    accumulation; bf16 for bf16 layers on the Pallas path), decays, gates and the inverse stay fp32.

    In a chunk with start state S0, positions i = 1..C and cumulative log-decay G_i = g_1 + ... + g_i, the writes
    delta_i = beta_i (v_i - (e^{g_i} S_{i-1})^T k_i) satisfy (I + M) delta = beta v - (beta k e^G) S0 with
    M_ij = beta_i (k_i . k_j) e^{G_i - G_j} for j < i. With T = (I + M)^{-1}, u = T (beta v), w = T (beta k e^G):
        delta = u - w S0
        o_i   = e^{G_i} S0^T q_i + sum_{j <= i} e^{G_i - G_j} (q_i . k_j) delta_j
        S_C   = e^{G_C} S0 + sum_j e^{G_C - G_j} k_j delta_j^T
    T is `chunk_inverse`, the weights attn_ij = e^{G_i - G_j} (q_i . k_j) `chunk_attn`. Only delta and S_C need the
    carried state: the recurrence (see `make_recurrence`) runs just those over the chunks, then o is two
    batched matmuls over all chunks at once (`_outputs`); or the Mosaic passes run it all from Ag = T diag(beta)
    as delta = Ag (v - e^G o k S0), without u and w (`_fused`). `kernels` says what runs each part.
    Across a reset (segment boundary) every decay factor is replaced by an exact zero through masks. `state` may be
    None (a zero start) only on the Mosaic passes (`kernels.outputs`), which then neither form nor load one.
    """
    b, t, h, _ = q.shape
    pad = -t % chunk_size
    if pad:
        # g = 0 and beta = 0 make padded tokens identity steps: no decay, no write.
        q, k, v, g, beta, reset = (
            None if x is None else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            for x in (q, k, v, g, beta, reset)
        )
    n = (t + pad) // chunk_size

    # Index of the segment inside its chunk: resets seen so far in the chunk, [b, 1, n, C]; None without resets
    # (no masks, and the Mosaic kernels neither read nor test one).
    seg = None if reset is None else jnp.cumsum(reset.reshape(b, n, chunk_size), axis=-1)[:, None]
    g, beta = _in_chunks(g, chunk_size), _in_chunks(beta, chunk_size)
    cum = jnp.cumsum(g, axis=-1)  # G_i, [b, h, n, C]
    if kernels.outputs is not None:  # q, k, v stay in their layout
        fused = _fused(kernels.outputs, kernels.factor, jnp.dtype(dtype), state is None)
        o, state = fused(q, k, v, beta, cum, seg, state)
    else:
        q, k, v = (_in_chunks(x, chunk_size) for x in (q, k, v))
        ag = chunk_inverse(k, beta, cum, seg, dtype) * beta[..., None, :]  # T diag(beta)
        u, w, k_out, decay, q_in = _recurrence_inputs(ag, v, k, q, cum, seg, dtype, jnp.float32)
        attn = chunk_attn(q, k, cum, seg, dtype)
        o, state = _outputs(kernels.recurrence, jnp.dtype(dtype))(u, w, k_out, decay, state, q_in, attn)
    return o[:, :t], state


_IMPLS: dict[str, Callable[..., tuple[Array, Array]]] = {"reference": _reference, "chunked": _chunked}


def gated_delta_rule(
    q: Float[Array, "b t h dk"],
    k: Float[Array, "b t h dk"],
    v: Float[Array, "b t h dv"],
    g: Float[Array, "b t h"],
    beta: Float[Array, "b t h"],
    *,
    scale: float | None = None,
    initial_state: Float[Array, "b h dk dv"] | None = None,
    segment_ids: Int[Array, "b t"] | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    impl: str = "auto",
) -> tuple[Float[Array, "b t h dv"], Float[Array, "b h dk dv"]]:
    """Gated delta rule over a sequence: S_t = e^{g_t} (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
    o_t = S_t^T q_t * scale.

    g is the log-decay (<= 0). With `segment_ids` (packed sequences) the state is reset to zero before every token
    whose id differs from the previous token's, so `initial_state` only feeds the first segment.
    `impl`: "chunked" (chunkwise UT transform, `chunk_size` a power of two), "reference" (token-by-token scan),
    "pallas" (the chunked form with its recurrence on the Pallas kernels of `pallas_gdn`, or on a Hopper GPU
    those of `mosaic_gdn` and the UT inverse of `mosaic_gdn_factors`: `pallas_common.gpu_drivers`; the
    operands of every matmul in q's dtype: bf16 layers multiply in bf16 with fp32 accumulation) or "auto" (Pallas on
    GPU/TPU when the shape is supported, else "chunked" with a logged reason; "chunked" on CPU).
    Returns (o in v.dtype, final state in fp32).
    """
    if impl not in pallas_common.IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {list(pallas_common.IMPLS)}")
    if not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a positive power of two, got {chunk_size!r}")
    specs = {
        "q": (q.shape, ("batch", "time", "heads", "dk")),
        "k": (k.shape, ("batch", "time", "heads", "dk")),
        "v": (v.shape, ("batch", "time", "heads", "dv")),
        "g": (g.shape, ("batch", "time", "heads")),
        "beta": (beta.shape, ("batch", "time", "heads")),
    }
    if initial_state is not None:
        specs["initial_state"] = (initial_state.shape, ("batch", "heads", "dk", "dv"))
    if segment_ids is not None:
        specs["segment_ids"] = (segment_ids.shape, ("batch", "time"))
    _check_shapes(specs)

    b, t, h, dk = q.shape
    impl, backend, interpret = pallas_common.choose(
        "gated_delta_rule", impl, lambda be: _unsupported(be, q.dtype, dk, v.shape[-1], chunk_size))
    scale = dk**-0.5 if scale is None else scale
    dtype = jnp.dtype(q.dtype)
    kernels = pallas_kernels(backend, interpret, dtype, dk, chunk_size, scale) if impl == "pallas" else None
    # The Mosaic passes apply the scale themselves (no pass over q before them); every other path takes q scaled.
    in_kernels = kernels is not None and kernels.outputs is not None
    q, k = _prepare_qk(q, k, 1.0 if in_kernels else scale, use_qk_l2norm)
    if initial_state is not None:
        state = initial_state.astype(jnp.float32)
    elif in_kernels:
        state = None  # the Mosaic passes start from zeros they neither receive nor load
    else:
        state = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)
    reset = None if segment_ids is None else jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], [(0, 0), (1, 0)])
    g32, beta32 = g.astype(jnp.float32), beta.astype(jnp.float32)
    if impl == "pallas":
        # q, k (normalised, and q scaled, in fp32) and v go on in the matmul dtype: the chunk layout moves
        # and the matmuls read them without a widening and a narrowing in between.
        o, state = _chunked(q.astype(dtype), k.astype(dtype), v.astype(dtype), g32, beta32, state, reset,
                            chunk_size, dtype, kernels)
        return o.astype(v.dtype), state
    o, state = _IMPLS[impl](q, k, v.astype(jnp.float32), g32, beta32, state, reset, chunk_size)
    return o.astype(v.dtype), state


def gated_delta_step(
    state: Float[Array, "b h dk dv"],
    q_t: Float[Array, "b h dk"],
    k_t: Float[Array, "b h dk"],
    v_t: Float[Array, "b h dv"],
    g_t: Float[Array, "b h"],
    beta_t: Float[Array, "b h"],
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
) -> tuple[Float[Array, "b h dv"], Float[Array, "b h dk dv"]]:
    """One decode token: S = e^{g_t} S; S = S + beta_t k_t (v_t - S^T k_t)^T; o_t = S^T q_t * scale.

    Returns (o_t in v_t.dtype, new state in fp32).
    """
    _check_shapes(
        {
            "state": (state.shape, ("batch", "heads", "dk", "dv")),
            "q_t": (q_t.shape, ("batch", "heads", "dk")),
            "k_t": (k_t.shape, ("batch", "heads", "dk")),
            "v_t": (v_t.shape, ("batch", "heads", "dv")),
            "g_t": (g_t.shape, ("batch", "heads")),
            "beta_t": (beta_t.shape, ("batch", "heads")),
        }
    )
    q_t, k_t = _prepare_qk(q_t, k_t, scale, use_qk_l2norm)
    state, v32, g32, beta32 = (x.astype(jnp.float32) for x in (state, v_t, g_t, beta_t))
    o_t, state = _delta_step(state, q_t, k_t, v32, g32, beta32)
    return o_t.astype(v_t.dtype), state
