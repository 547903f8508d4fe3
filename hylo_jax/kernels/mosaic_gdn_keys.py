"""Mosaic GPU (Hopper: wgmma, TMA) kernel of the gated delta rule's chunk-local backward for the keys and queries
(`gated_delta._fused`): what XLA's VJP of T diag(beta), of w, the decayed keys and queries of
`gated_delta._recurrence_inputs` and of `gated_delta.chunk_attn` would do, one CTA (one warpgroup) per (chunk,
batch*head). In a chunk, with G, E (causal) and Es (strict) as in `mosaic_gdn_factors`, d_in, d_out the decays of
`gated_delta._gate_decays`, the forward was

    M = diag(beta) (K K^T o Es),  T = (I + M)^{-1},  Ag = T diag(beta),  A' = Ag diag(d_in)
    w = A' K,  k_out = d_out o K,  q_in = d_in o Q,  attn = (Q K^T) o E,  Q = scale q (the scale applied here)

and from the cotangents of w, k_out, q_in (the gradient pass), of attn and of Ag through u = Ag v (the value pass)
the kernel forms, over key blocks of `KB` columns (two walks: [C, C] sums first, then the [C, KB] products),

    A'_bar = w_bar K^T,  Ag_bar = Ag_bar(u) + A'_bar diag(d_in),  T_bar = Ag_bar diag(beta)
    M_bar  = -tril(T^T T_bar T^T, -1),  B = M_bar o beta_i o Es (the cotangent of K K^T),  QK_bar = attn_bar o E
    Q_bar  = d_in o q_in_bar + QK_bar K
    K_bar  = d_out o k_out_bar + A'^T w_bar + QK_bar^T Q + (B + B^T) K

and the parts of the gates' and beta's cotangents as vectors by row (i) and by column (j), which the caller adds:
from E (rows: + sum_j P_ij, columns: - sum_i P_ij, with P = attn_bar o attn + M_bar o M), beta (rows: sum_j
M_bar o K K^T o Es, columns: sum_i Ag_bar o T), d_in (rows: sum_k Q o q_in_bar, columns: sum_i A'_bar o Ag) and
d_out (rows: sum_k K o k_out_bar). Products of [C, KB] operands take them in the operand dtype (as XLA's VJP of
`gated_delta.matmul` does), M_bar's two products split fp32 into high and low parts (`mosaic_gdn_factors`).

On CPU the kernel runs in the GPU interpreter and is lowered for CUDA (`mosaic_common`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .mosaic_common import (
    BY_COL,
    BY_ROW,
    F32,
    WGMMA,
    Ops,
    chunk_loop,
    fit,
    gpu_kernel,
    high_low,
    send,
    smem,
    store,
    vectors,
)

KB = 64  # key columns per step of the two walks
VECTORS = ("gate_rows", "gate_cols", "beta_rows", "beta_cols", "d_in_rows", "d_in_cols", "d_out_rows")


def key_gradients(q, k, t, beta, g, seg, q_bar, w_bar, k_bar, attn_bar, ag_bar, *, chunk: int, scale: float = 1.0,
                  stages: int = 2, interpret=None):
    """(q_bar = scale Q_bar, K_bar [b, n*C, h, dk] in q's dtype, *the vectors of `VECTORS` [X, n*C] fp32) (module
    docstring; Q = scale q).
    q, k [b, n*C, h, dk] in the operand dtype; t, attn_bar, ag_bar [X, n*C, C], beta, g (G) [X, n*C] and the
    segment index seg [b, n*C], fp32; q_bar, w_bar, k_bar (of q_in, w, k_out) [X, n*C, dk] fp32; X = b h."""
    b, tp, heads, dk = q.shape
    rows_, cdt, kb = b * heads, q.dtype, min(KB, dk)
    ops = Ops(bool(interpret), chunk)
    c = chunk

    def slot_buffers(stages):  # q, k, then q_bar, w_bar, k_bar: each walk's, in a scope of its own
        return [smem((stages, c, kb), cdt)] * 2 + [smem((stages, c, kb), F32)] * 3

    fixed = [*[vectors((c,))] * 3,  # beta, G, segment index
             *[smem((c, c), cdt)] * 3, smem((c, kb), cdt),  # A', QK_bar, B; w_bar as an operand (second walk)
             smem((2, c, kb), cdt), smem((2, c, kb), cdt)]  # Q_bar, K_bar on their way out
    middle_buffers = [*[smem((c, c), F32)] * 3, *[smem((c, c), cdt)] * 4]  # T, attn_bar, Ag_bar; T's, Z's parts
    stages = fit(slot_buffers, fixed, stages, dk // kb, "GDN key gradient", interpret)  # (the middle needs less)

    def kernel(q_ref, k_ref, t_ref, beta_ref, g_ref, seg_ref, qb_ref, wb_ref, kb_ref, attnb_ref, agb_ref,
               dq_out, dk_out, *vec_outs):
        row, tokens = lax.axis_index("rows"), pl.ds(lax.axis_index("chunks") * c, c)

        def keys(j):  # [b, n*C, h, dk]
            return row // heads, tokens, row % heads, pl.ds(j * kb, kb)

        def by_row(j):  # [X, n*C, dk]
            return row, tokens, pl.ds(j * kb, kb)

        def walk(step, carry, q_sm, k_sm, qb_sm, wb_sm, kbar_sm, ready):
            sources = [(q_ref, q_sm, keys), (k_ref, k_sm, keys), (qb_ref, qb_sm, by_row), (wb_ref, wb_sm, by_row),
                       (kb_ref, kbar_sm, by_row)]
            return chunk_loop(functools.partial(step, q_sm, k_sm, qb_sm, wb_sm, kbar_sm), carry, sources=sources,
                              ready=ready, stages=stages, n_chunks=dk // kb, reverse=False)

        def walk_scope(step, carry):
            return pl.run_scoped(functools.partial(walk, step, carry), *slot_buffers(stages),
                                 plgpu.Barrier(num_arrivals=5, num_barriers=stages))

        def sums(q_sm, k_sm, qb_sm, wb_sm, kbar_sm, j, slot, carry):
            """Q K^T, K K^T, w_bar K^T and the row dots of Q, q_in_bar and of K, k_out_bar."""
            qk, kk, wk, d_in_rows, d_out_rows = carry
            q_s, k_s = q_sm.at[slot], k_sm.at[slot]
            w16 = ops.load(wb_sm.at[slot], WGMMA).astype(cdt)
            qk, kk, wk = ops.matmuls(([(q_s, ("T", k_s))], qk), ([(k_s, ("T", k_s))], kk), ([(w16, ("T", k_s))], wk))
            d_in_rows += jnp.sum(ops.load(q_s, WGMMA).astype(F32) * ops.load(qb_sm.at[slot], WGMMA), axis=1)
            d_out_rows += jnp.sum(ops.load(k_s, WGMMA).astype(F32) * ops.load(kbar_sm.at[slot], WGMMA), axis=1)
            plgpu.commit_smem()  # a warpgroup barrier: every warp is done with the slot before its refill
            return qk, kk, wk, d_in_rows, d_out_rows

        def body(beta_sm, g_sm, seg_sm, a_sm, qkb_sm, b_sm, wb16_sm, dq_sm, dk_sm, gates_ready):
            for src, dst in ((beta_ref, beta_sm), (g_ref, g_sm)):
                plgpu.copy_gmem_to_smem(src.at[row, tokens], dst, gates_ready)
            plgpu.copy_gmem_to_smem(seg_ref.at[row // heads, tokens], seg_sm, gates_ready)
            square, vec = ops.zeros((c, c)), jnp.zeros((c,), F32)
            if not ops.interpret:
                vec = plgpu.layout_cast(vec, BY_ROW)
            qk, kk, wk, d_in_rows, d_out_rows = walk_scope(sums, (square, square, square, vec, vec))
            plgpu.barrier_wait(gates_ready)
            g_i, s_i, beta_i = (ops.load(v, BY_ROW) for v in (g_sm, seg_sm, beta_sm))
            g_j, s_j, beta_j = (ops.load(v, BY_COL) for v in (g_sm, seg_sm, beta_sm))

            def middle(t_sm, attnb_sm, agb_sm, hi_sm, lo_sm, z_hi_sm, z_lo_sm, ready):
                """The [C, C] work, in an order that keeps few of them live (each leaves for shared memory or a
                vector sum as soon as it can): Ag's side, then M_bar's products, then B and attn's side."""
                for src, dst in ((t_ref, t_sm), (attnb_ref, attnb_sm), (agb_ref, agb_sm)):
                    plgpu.copy_gmem_to_smem(src.at[row, tokens], dst, ready)
                plgpu.barrier_wait(ready)
                d_in_j = ops.square(jnp.where(s_j == 0, jnp.exp(g_j), 0.0), 1)
                t = ops.load(t_sm, WGMMA)
                ag = t * ops.square(beta_j, 1)
                a_sm[...] = (ag * d_in_j).astype(cdt)  # A' (read in the second walk)
                d_in_cols = jnp.sum(wk * ag, axis=0)
                ag_bar = ops.load(agb_sm, WGMMA) + wk * d_in_j
                beta_cols = jnp.sum(ag_bar * t, axis=0)
                t_hi, t_lo = high_low(t, cdt)
                hi_sm[...] = t_hi
                lo_sm[...] = t_lo
                plgpu.commit_smem()
                # M_bar = -tril(T^T (T_bar T^T), -1), each product on split parts
                tb_hi, tb_lo = high_low(ag_bar * ops.square(beta_j, 1), cdt)
                z = ops.matmul((c, c), (tb_hi, ("T", hi_sm)), (tb_hi, ("T", lo_sm)), (tb_lo, ("T", hi_sm)))
                z_hi, z_lo = high_low(z, cdt)
                z_hi_sm[...] = z_hi
                z_lo_sm[...] = z_lo
                plgpu.commit_smem()
                tz = ops.matmul((c, c), (("T", hi_sm), z_hi_sm), (("T", hi_sm), z_lo_sm), (("T", lo_sm), z_hi_sm))
                strict = ops.decay(g_i, s_i, g_j, s_j, strict=True)
                m_bar_strict = jnp.where(ops.iota(0) > ops.iota(1), -tz, 0.0) * strict
                beta_rows = jnp.sum(m_bar_strict * kk, axis=1)
                b_mat = m_bar_strict * ops.square(beta_i, 0)
                p = b_mat * kk  # M_bar o M
                b_sm[...] = b_mat.astype(cdt)
                qk_bar = ops.load(attnb_sm, WGMMA) * ops.decay(g_i, s_i, g_j, s_j) * scale  # of q K^T, not Q K^T
                p = p + qk_bar * qk  # + attn_bar o attn
                qkb_sm[...] = qk_bar.astype(cdt)
                plgpu.commit_smem()
                return (jnp.sum(p, axis=1), -jnp.sum(p, axis=0), beta_rows, beta_cols, d_in_rows * scale, d_in_cols,
                        d_out_rows)

            outs = pl.run_scoped(middle, *middle_buffers, plgpu.Barrier(num_arrivals=3))
            d_in_i = jnp.where(s_i == 0, jnp.exp(g_i), 0.0)
            q_in_i = d_in_i * scale  # q_in = d_in o scale q
            s_last, g_last = seg_sm[c - 1], g_sm[c - 1]
            d_out_i = jnp.where(s_i == s_last, jnp.exp(g_last - g_i), 0.0)

            def products(q_sm, k_sm, qb_sm, wb_sm, kbar_sm, j, slot, carry):
                """Q_bar and K_bar of key block j."""
                q_s, k_s = q_sm.at[slot], k_sm.at[slot]
                wb16_sm[...] = ops.load(wb_sm.at[slot], WGMMA).astype(cdt)
                plgpu.commit_smem()
                init_q = ops.load(qb_sm.at[slot], WGMMA) * lax.broadcast_in_dim(q_in_i, (c, kb), [0])
                init_k = ops.load(kbar_sm.at[slot], WGMMA) * lax.broadcast_in_dim(d_out_i, (c, kb), [0])
                dq, dk_ = ops.matmuls(([(qkb_sm, k_s)], init_q),
                                      ([(("T", a_sm), wb16_sm), (("T", qkb_sm), q_s), (b_sm, k_s), (("T", b_sm), k_s)],
                                       init_k))
                out = lax.rem(j, 2)
                # (store's commit_smem is a warpgroup barrier: every warp is done with the slot before its refill)
                store(2, (dq, dq_sm.at[out], dq_out.at[keys(j)]), (dk_, dk_sm.at[out], dk_out.at[keys(j)]))
                return carry

            walk_scope(products, None)
            plgpu.wait_smem_to_gmem(0)
            return outs

        outs = pl.run_scoped(body, *fixed, plgpu.Barrier(num_arrivals=3))

        send([(value, out.at[row, tokens]) for value, out in zip(outs, vec_outs, strict=True)],
             [vectors((c,))] * len(VECTORS))

    grads = jax.ShapeDtypeStruct(q.shape, cdt)
    vec = jax.ShapeDtypeStruct((rows_, tp), F32)
    run = gpu_kernel(kernel, "gdn_key_gradients", out_type=(grads, grads, *[vec] * len(VECTORS)),
                     grid=(tp // c, rows_), grid_names=("chunks", "rows"), interpret=interpret)
    return run(q, k, t, beta, g, seg, q_bar, w_bar, k_bar, attn_bar, ag_bar)
