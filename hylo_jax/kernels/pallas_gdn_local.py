"""Pallas kernels for the chunk-local part of the chunked gated delta rule (`gated_delta._chunked`), forward
and backward (`jax.custom_vjp`). One program per (batch*head, chunk), all chunks in parallel. In a chunk
(G the chunk-local cumulative log-decay, E_ij = e^{G_i - G_j} for j <= i in the same segment, else 0):

    L     = strict_tril(beta_i (k_i . k_j) E_ij),     T = (I + L)^{-1}              (the UT transform)
    u     = T (beta v),    w = T (beta e^G k),    attn = (q k^T) o E,
    q_in  = e^G q,         k_out = e^{G_C - G} k

(`pallas_common.decays` zeroes every factor across a segment reset). T comes from log2(C) doublings of
its block-diagonal part, T_2s = T_s - T_s L_s T_s with L_s the blocks of L just below the s-blocks (the
block form of forward substitution), each two C x C x C matmuls; the forward keeps T (fp32) for the
backward. The backward is the VJP of the same map: with dT = dw (beta e^G k)^T + du (beta v)^T,
dL = -T^T dT T^T (strict lower part), and the products with k, q, v by the chain rule.

These replace the chunked path's XLA ops between the layout change and the state recurrence (`pallas_gdn`):
one pass over q, k, v per chunk instead of a dozen fusions and batched matmuls. Operands of the matmuls with
the data in the inputs' dtype (bf16 layers: bf16, as in the XLA path), T and the decays in fp32 (T's
products with itself in `TF32_X3` on GPU, exact elsewhere). Value and key widths are processed in tiles of
128 columns (registers on GPU; lanes on TPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import pallas_common as pc
from .pallas_common import F32, mm

TILE = 128
GPU_NUM_WARPS = 8


def _tiles(d: int) -> list[slice]:
    t = min(d, TILE)
    return [slice(i, i + t) for i in range(0, d, t)]


def _rowsum(x):
    return jnp.sum(x, axis=1, keepdims=True)


def _unit_lower_inverse(lower, prec):
    """(I + lower)^{-1} for a strictly lower (C, C) `lower`, C a power of two: T_1 = I, then
    T_2s = T_s - T_s L_s T_s, L_s = the entries whose row and column share a 2s-block but not an s-block."""
    c = lower.shape[0]
    rows, cols = pc.iotas(c)
    t = jnp.where(rows == cols, 1.0, 0.0).astype(F32)
    apart = jnp.bitwise_xor(rows, cols)  # s <= r ^ c < 2s: same 2s-block, different s-blocks
    s = 1
    while s < c:
        l_s = jnp.where((apart >= s) & (apart < 2 * s), lower, 0.0)
        t = t - mm(mm(t, l_s, f32_precision=prec), t, f32_precision=prec)
        s *= 2
    return t


def _chunk_maps(gc, gr, sc, sr):
    """(decays, E with the diagonal removed) of one chunk."""
    dec = pc.decays(gc[...], gr[...], sc[...], sr[...])
    rows, cols = pc.iotas(dec.causal.shape[0])
    return dec, jnp.where(rows > cols, dec.causal, 0.0)


def _forward_kernel(prec, q, k, v, beta, gc, gr, sc, sr, u, w, attn, q_in, k_out, t):
    cdt = k.dtype
    kb, qb, bcol = k[...], q[...], beta[...]
    dec, strict = _chunk_maps(gc, gr, sc, sr)
    tinv = _unit_lower_inverse(bcol * mm(kb, kb, tb=True) * strict, prec)
    t[...] = tinv
    tl = tinv.astype(cdt)
    attn[...] = (mm(qb, kb, tb=True) * dec.causal).astype(attn.dtype)
    q_in[...] = (dec.d_in * qb.astype(F32)).astype(q_in.dtype)
    k_out[...] = (dec.d_out * kb.astype(F32)).astype(k_out.dtype)
    for sl in _tiles(k.shape[-1]):
        w[:, sl] = mm(tl, (bcol * dec.d_in * k[:, sl].astype(F32)).astype(cdt)).astype(w.dtype)
    for sl in _tiles(v.shape[-1]):
        u[:, sl] = mm(tl, (bcol * v[:, sl].astype(F32)).astype(cdt)).astype(u.dtype)


def _backward_kernel(prec, q, k, v, beta, gc, gr, sc, sr, t, du, dw, dattn, dq_in, dk_out,
                     dq, dk, dv, dbeta, dg):
    cdt = k.dtype
    lo = lambda z: z.astype(cdt)  # noqa: E731
    kb, qb, bcol = k[...], q[...], beta[...]
    dec, strict = _chunk_maps(gc, gr, sc, sr)
    tinv = t[...]
    tl = lo(tinv)
    kk = mm(kb, kb, tb=True)
    c = kk.shape[0]
    d_t = jnp.zeros((c, c), F32)  # dL/dT
    d_beta = jnp.zeros((c, 1), F32)
    d_in = jnp.zeros((c, 1), F32)  # dL/d e^G (carried-in segment)
    d_out = jnp.zeros((c, 1), F32)  # dL/d e^{G_C - G}
    for sl in _tiles(v.shape[-1]):  # u = T (beta v)
        du_t, v_t = lo(du[:, sl]), v[:, sl].astype(F32)
        d_bv = mm(tl, du_t, ta=True)
        dv[:, sl] = (bcol * d_bv).astype(dv.dtype)
        d_beta += _rowsum(d_bv * v_t)
        d_t += mm(du_t, lo(bcol * v_t), tb=True)
    b_in = bcol * dec.d_in
    for sl in _tiles(k.shape[-1]):  # w = T (beta e^G k)
        dw_t, k_t = lo(dw[:, sl]), k[:, sl].astype(F32)
        s_bk = _rowsum(mm(tl, dw_t, ta=True) * k_t)
        d_beta += dec.d_in * s_bk
        d_in += bcol * s_bk
        d_t += mm(dw_t, lo(b_in * k_t), tb=True)
    # T = (I + L)^{-1}: dL = -T^T dT T^T; every use below multiplies by the strict decays (masks it).
    d_l = -mm(mm(tinv, d_t, ta=True, f32_precision=prec), tinv, tb=True, f32_precision=prec)
    d_kk = d_l * bcol * strict
    d_beta += _rowsum(d_l * kk * strict)
    d_qk = dattn[...].astype(F32) * dec.causal
    z = d_kk * kk + d_qk * mm(qb, kb, tb=True)  # dL/dE o E, summed over L and attn
    d_kk_sym, d_qk_l = lo(d_kk + d_kk.T), lo(d_qk)
    for sl in _tiles(k.shape[-1]):
        q_t, k_t = q[:, sl], k[:, sl]
        dqi_t, dko_t = dq_in[:, sl].astype(F32), dk_out[:, sl].astype(F32)
        d_in += _rowsum(dqi_t * q_t.astype(F32))
        d_out += _rowsum(dko_t * k_t.astype(F32))
        dq[:, sl] = (mm(d_qk_l, k_t) + dec.d_in * dqi_t).astype(dq.dtype)
        dk[:, sl] = (mm(d_kk_sym, k_t) + mm(d_qk_l, q_t, ta=True) + b_in * mm(tl, lo(dw[:, sl]), ta=True)
                     + dec.d_out * dko_t).astype(dk.dtype)
    dbeta[...] = d_beta
    dg[...] = pc.decay_grads(dec, z, d_in, d_out, jnp.zeros((1, 1), F32))


def _seq(x):
    """[b, h, n, C, d] -> [b*h, n*C, d]."""
    return x.reshape(x.shape[0] * x.shape[1], -1, x.shape[-1])


def _cols(x, h: int):
    """[b, h or 1, n, C] -> [b*h, n, C, 1] and [b*h, n, 1, C] (segment indices are shared by the heads)."""
    b, _, n, c = x.shape
    x = jnp.broadcast_to(x, (b, h, n, c)).reshape(b * h, n, c)
    return pc.as_col(x), pc.as_row(x)


@functools.cache
def chunk_local(backend: str, interpret: Any, dtype: Any, precision: Any = None,
                num_warps: int = GPU_NUM_WARPS) -> Callable:
    """The chunk-local map on the Pallas kernels of ``backend`` ("gpu": Triton, "tpu": Mosaic TPU):
    f(q, k, v [b,h,n,C,d] in `dtype`, beta, cum [b,h,n,C], seg [b,1,n,C] fp32) -> (u fp32, w, attn, q_in,
    k_out in `dtype`), as `gated_delta._chunk_local` computes it; run per device under a set mesh.
    ``precision`` of the fp32 products with T (default `TF32_X3` on a GPU, exact elsewhere)."""
    prec = precision or (pc.TF32_X3 if backend == "gpu" and not interpret else jax.lax.Precision.HIGHEST)
    sds = jax.ShapeDtypeStruct

    def inputs(q, k, v, beta, cum, seg):
        h = q.shape[1]
        (gc, gr), (sc, sr), (bc, _) = _cols(cum, h), _cols(seg, h), _cols(beta, h)
        return dict(q=("seq", _seq(q)), k=("seq", _seq(k)), v=("seq", _seq(v)), beta=("col", bc),
                    gc=("col", gc), gr=("row", gr), sc=("col", sc), sr=("row", sr))

    def call(kernel, ins, outs, n, c):
        return pc.run_parallel(functools.partial(kernel, prec), ins, outs, n, c, backend, interpret,
                               num_warps=num_warps)

    def forward(q, k, v, beta, cum, seg):
        b, h, n, c, dk = q.shape
        x, dv = b * h, v.shape[-1]
        outs = dict(u=("seq", sds((x, n * c, dv), F32)), w=("seq", sds((x, n * c, dk), dtype)),
                    attn=("seq", sds((x, n * c, c), dtype)), q_in=("seq", sds((x, n * c, dk), dtype)),
                    k_out=("seq", sds((x, n * c, dk), dtype)), t=("seq", sds((x, n * c, c), F32)))
        r = call(_forward_kernel, inputs(q, k, v, beta, cum, seg), outs, n, c)
        shaped = lambda a: a.reshape(b, h, n, c, a.shape[-1])  # noqa: E731
        return tuple(shaped(r[nm]) for nm in ("u", "w", "attn", "q_in", "k_out")), r["t"]

    @jax.custom_vjp
    def local(q, k, v, beta, cum, seg):
        return forward(q, k, v, beta, cum, seg)[0]

    def local_fwd(q, k, v, beta, cum, seg):
        outs, t = forward(q, k, v, beta, cum, seg)
        return outs, (q, k, v, beta, cum, seg, t)

    def local_bwd(res, cots):
        q, k, v, beta, cum, seg, t = res
        b, h, n, c, dk = q.shape
        x = b * h
        du, dw, dattn, dq_in, dk_out = cots
        ins = inputs(q, k, v, beta, cum, seg)
        ins.update(t=("seq", t), du=("seq", _seq(du).astype(F32)), dw=("seq", _seq(dw)), dattn=("seq", _seq(dattn)),
                   dq_in=("seq", _seq(dq_in)), dk_out=("seq", _seq(dk_out)))
        outs = dict(dq=("seq", sds((x, n * c, dk), q.dtype)), dk=("seq", sds((x, n * c, dk), k.dtype)),
                    dv=("seq", sds((x, n * c, v.shape[-1]), v.dtype)), dbeta=("col", sds((x, n, c, 1), F32)),
                    dg=("col", sds((x, n, c, 1), F32)))
        r = call(_backward_kernel, ins, outs, n, c)
        return (r["dq"].reshape(q.shape), r["dk"].reshape(k.shape), r["dv"].reshape(v.shape),
                r["dbeta"].reshape(beta.shape), r["dg"].reshape(cum.shape), jnp.zeros_like(seg))

    local.defvjp(local_fwd, local_bwd)

    def specs(rows, heads):
        seq, per_pos = P(rows, heads, None, None, None), P(rows, heads, None, None)
        return (seq, seq, seq, per_pos, per_pos, P(rows, None, None, None)), (seq,) * 5

    def on_device(q, k, v, beta, cum, seg):
        return pc.on_mesh(local, specs, *q.shape[:2])(q, k, v, beta, cum, seg)

    return on_device
