"""Mosaic GPU (Hopper: wgmma, TMA) kernels for the sequential part of the chunked gated delta rule together with
the outputs it feeds (`gated_delta._fused`). Over chunks c, with q, k, v, the gated UT factor
Ag = T diag(beta) (`gated_delta.chunk_inverse`), and G, d_in, d_out, d_c the chunk's decays
(`mosaic_common.ChunkGates`):

    delta_c = Ag_c (v_c - d_in o k_c S_c)                 (= u - w S_c of `gated_delta._chunked`)
    o_c     = d_in o (q_c S_c) + attn_c delta_c,   attn_c = (q_c k_c^T) o E_c
    S_{c+1} = d_c S_c + k_c^T (d_out o delta_c)                                                       (forward)

and, backward (c descending, G the cotangent of S_{c+1}, from the final state's; o_bar the outputs'; w, k, q the
decayed ones of `gated_delta._chunked`),

    D_c = attn_c^T o_bar_c + k_c G,   G <- q_c^T o_bar_c + d_c G - w_c^T D_c                          (reverse)

so the cotangents of the per-chunk states and deltas never exist as arrays.

Both passes run one CTA of two warpgroups per (batch*head, value block of `vb` columns: `value_block`) over the
same inputs per chunk, q, k, Ag, G, the segment index and the chunk's block of v (forward) or o_bar (reverse),
arriving by TMA `stages` chunks ahead; v, o and o_bar stay in the op's [b, t, h, dv] layout. Neither u, w nor
attn is read. One warpgroup (the carrier) holds the [dk, vb] fp32 block of S (or G) in registers (the wgmma
accumulator layout); the other forms what does not need it and issues the copies (so the carried chain neither
issues them nor waits for a slot's release; with the overlap below, 4 x 4096 forward 0.413 -> 0.387 ms on the
H100, session 21), and the two hand [C, vb] and [dk, vb] operands over in shared memory (one buffer each; the
next chunk's waits until the reader is done). The S^T carrier (forward alone, value blocks of 64) takes S^T's
bf16 copy as the left operand of its first product from registers and publishes it while that product runs, as
it publishes delta during the update:
  forward: the carrier computes k S, delta and the update; the other side q k^T (attn) and q S, then o;
  reverse: with w = Ag diag(d_in) k and k, q undecayed, D = attn^T o_bar + d_out o (k G) and
           G <- d_c G + q^T (d_in o o_bar) + k^T y, y = -d_in o (Ag^T D); the carrier computes D and G, the
           other side attn^T, d_in o o_bar and y.
The forward may also send out what the backward needs (S_c and delta_c, the wgmma operands already); the
reverse pass sends G entering each chunk's end and D_c (= u_bar), which a gradient pass per (key block, chunk)
reads with S_c. Everything read and sent is in the operand dtype (bf16 for bf16 layers, as fla's kernels keep u,
w and the chunk states); the carried blocks and every accumulation are fp32. The initial and final states pass
through a shared-memory buffer of their own scope, so the chunk loop can take the space.

On CPU the kernels run in the GPU interpreter and are lowered for CUDA (`mosaic_common`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from . import mosaic_gdn_keys
from .mosaic_common import (
    F32,
    SMEM_BYTES,
    WGMMA,
    ChunkGates,
    Ops,
    carry_state,
    chunk_loop,
    device_dtype,
    dtype_reason,
    fit,
    gpu_kernel,
    nbytes,
    send,
    smem,
    store,
    two_warpgroup_loop,
    vectors,
)
from .pallas_common import grid_cores
from .pallas_gdn import chunk_rows as rows
from .pallas_gdn import seq_rows

TMA_BOX = 256  # the most elements a TMA box takes along one dimension
VB = 64  # value columns a CTA: a [256, 64] fp32 state block is 128 registers a thread


def value_block(rows: int, dv: int, cores: int) -> int:
    """Both passes' value block: `VB` columns (each CTA reads q, k and Ag once for twice the state columns of 32)
    when that still gives every SM a CTA, else half as many (a short batch: 1 x 6 heads x 512 would fill 48 of 132
    SMs at 64, 96 at 32)."""
    vb = min(VB, dv)
    if rows * (dv // vb) < cores and vb % 32 == 0:  # half of it is still a multiple of 16 dividing d_v
        return vb // 2
    return vb


def unsupported(dk: int, dv: int, chunk: int, dtype, vb: int | None = None) -> str | None:
    """Why the kernels cannot take this shape with value blocks of `vb` (default the largest, `VB`) columns (None
    if they can)."""
    if reason := dtype_reason(dtype):
        return reason
    if dk % 64 or chunk % 64 or dk > TMA_BOX or chunk > TMA_BOX:
        return f"d_k={dk} and chunk_size={chunk} must be multiples of 64 (wgmma rows), at most {TMA_BOX} (TMA)"
    vb = vb or min(VB, dv)
    if dv % vb or vb % 16 or vb > 128:
        return f"value block {vb} must divide d_v={dv} and be a multiple of 16, at most 128"
    if dk * vb > 256 * 64:
        return f"state block {dk} x {vb} too large for one warpgroup's registers"
    for fixed in (_forward_fixed, _reverse_fixed):
        need = nbytes(_slots(chunk, dk, vb, dtype, 1) + fixed(chunk, dk, vb, dtype))
        if need > SMEM_BYTES:
            return f"chunk {chunk}, d_k {dk}, value block {vb}: {need} B of shared memory > {SMEM_BYTES}"
    return None


def _swizzle(vb: int, cdt) -> int:
    """The swizzle of every wgmma operand: the state block's rows ([dk, vb]) set it, and a wgmma's operands
    share one."""
    return min(128, vb * jnp.dtype(cdt).itemsize)


class _Slots(NamedTuple):
    """Both passes' inputs per TMA slot: q_c, k_c, Ag_c, the chunk's block of v (forward) or o_bar (reverse), then
    G and the segment index ([C] vectors; None without segments)."""

    q: object
    k: object
    ag: object
    tok: object
    g: object
    seg: object = None


def _slots(chunk, dk, vb, cdt, stages: int, segmented: bool = True) -> list:
    sw = _swizzle(vb, cdt)
    return [smem((stages, chunk, dk), cdt, sw), smem((stages, chunk, dk), cdt, sw),
            smem((stages, chunk, chunk), cdt, sw), smem((stages, chunk, vb), cdt, sw),
            *[vectors((stages, chunk))] * (1 + segmented)]


def _forward_fixed(chunk, dk, vb, cdt) -> list:
    """The state entering the chunk as an operand (both sides read it; also what is saved), the state side's
    [C, vb] operand (v - d_in o k S, then d_out o delta), delta_c (the output side's operand; saved), o_c on its
    way out."""
    sw = _swizzle(vb, cdt)
    return [smem((dk, vb), cdt, sw), smem((chunk, vb), cdt, sw), smem((chunk, vb), cdt, sw), smem((chunk, vb), cdt)]


def _forward_fixed_t(chunk, dk, vb, cdt) -> list:
    """The transposed forward's: S^T and delta^T as the output side's operands, o_c on its way out."""
    sw = _swizzle(vb, cdt)
    return [smem((vb, dk), cdt, sw), smem((vb, chunk), cdt, sw), smem((chunk, vb), cdt)]


def _reverse_fixed(chunk, dk, vb, cdt) -> list:
    """G entering the chunk's end as an operand (also sent out), then from the other side attn^T and d_in o o_bar,
    D_c (sent out; the other side's operand) and y = -d_in o Ag^T D_c."""
    sw = _swizzle(vb, cdt)
    return [smem((dk, vb), cdt, sw), smem((chunk, chunk), cdt, sw), *[smem((chunk, vb), cdt, sw)] * 3]


@dataclasses.dataclass(frozen=True)
class _Call:
    chunk: int
    vb: int
    stages: int
    interpret: object
    heads: int  # v, o and o_bar are in the op's [b, n*C, h, dv] layout: row = batch * heads + head


@dataclasses.dataclass(frozen=True)
class _Place:
    """Where the CTA of (row = batch * heads + head, value block) reads and writes chunk i of `n_chunks`."""

    row: jax.Array
    vblock: pl.Slice
    chunk: int
    heads: int
    n_chunks: int

    def tokens(self, i):
        return pl.ds(i * self.chunk, self.chunk)

    def by_row(self, i):  # [X, n*C, ...]: Ag, G
        return self.row, self.tokens(i)

    def keys(self, i):  # [b, n*C, h, dk]: q, k
        return self.row // self.heads, self.tokens(i), self.row % self.heads

    def by_batch(self, i):  # [b, n*C]: the segment index
        return self.row // self.heads, self.tokens(i)

    def in_sequence(self, i):  # [b, n*C, h, dv]: v, o, o_bar
        return self.row // self.heads, self.tokens(i), self.row % self.heads, self.vblock

    def values(self, i):  # [X, n*C, dv]: delta_c, D_c
        return self.row, self.tokens(i), self.vblock

    def per_chunk(self, i):  # [X, n, dk, dv]: S_c, G_{c+1}
        return self.row, i, slice(None), self.vblock

    @property
    def state(self):  # [X, dk, dv]
        return self.row, slice(None), self.vblock

    @property
    def state_t(self):  # [X, dv, dk]: S^T, the forward's carried block when nothing is saved
        return self.row, self.vblock, slice(None)


def _pass(call: _Call, name: str, sides: Callable, fixed: Callable, ins: tuple, out_type: list, *, reverse: bool,
          transposed: bool = False):
    """One pass of two warpgroups over the chunks (last to first if `reverse`) of a grid of (row, value block)
    CTAs. `ins` = (ag [X, n*C, C], the per-token input (v or o_bar) [b, n*C, h, dv], k, q [b, n*C, h, dk] in the
    operand dtype, G [X, n*C] and the segment index [b, n*C] fp32, the carried block's start [X, dk, dv] fp32, or
    [X, dv, dk] if `transposed`, or None: zeros; the segment index None: no resets, none read); `out_type` ends
    with the carried block's end.
    `sides(ops, at, outs, slots, fixed refs, (consumed, *handovers))` -> (carrier step, other step, handovers the
    carrier drains) (`mosaic_common.two_warpgroup_loop`)."""
    ag, k = ins[0], ins[2]
    (rows_, tp, _), dk = ag.shape, k.shape[-1]
    dv, chunk, vb, cdt = out_type[-1].shape[-2 if transposed else -1], call.chunk, call.vb, k.dtype
    n_chunks, segmented = tp // chunk, ins[5] is not None
    ops = Ops(bool(call.interpret), chunk)
    slot_buffers = functools.partial(_slots, chunk, dk, vb, cdt, segmented=segmented)
    fixed_buffers = fixed(chunk, dk, vb, cdt)
    stages = fit(slot_buffers, fixed_buffers, call.stages, n_chunks, name, call.interpret)

    def kernel(ag_ref, tok_ref, k_ref, q_ref, g_ref, seg_ref, start_ref, *outs):
        at = _Place(lax.axis_index("rows"), pl.ds(lax.axis_index("vblocks") * vb, vb), chunk, call.heads, n_chunks)

        def loop(carried, *refs):
            n_slots = 5 + segmented
            slots = _Slots(*refs[:n_slots])
            fixed_refs = refs[n_slots:n_slots + len(fixed_buffers)]
            ready, consumed, *handovers = refs[n_slots + len(fixed_buffers):]
            sources = [(q_ref, slots.q, at.keys), (k_ref, slots.k, at.keys), (ag_ref, slots.ag, at.by_row),
                       (tok_ref, slots.tok, at.in_sequence), (g_ref, slots.g, at.by_row),
                       (seg_ref, slots.seg, at.by_batch)][:n_slots]
            carrier, other, drained = sides(ops, at, outs, slots, fixed_refs, (consumed, *handovers))
            return two_warpgroup_loop(ops, carrier, other, carried, consumed=consumed, handovers=drained,
                                      other_fetches=True,
                                      sources=sources, ready=ready, stages=stages, n_chunks=n_chunks, reverse=reverse)

        barriers = [plgpu.Barrier(num_arrivals=5 + segmented, num_barriers=stages),
                    plgpu.Barrier(num_arrivals=2, num_barriers=stages), *[plgpu.Barrier(num_barriers=1)] * 4]
        block = at.state_t if transposed else at.state
        carry_state(ops, None if start_ref is None else start_ref.at[block], outs[-1].at[block], loop,
                    [*slot_buffers(stages), *fixed_buffers, *barriers], owner=lax.axis_index("wg") == 0)

    run = gpu_kernel(kernel, name, out_type=tuple(out_type), grid=(rows_, dv // vb), grid_names=("rows", "vblocks"),
                     interpret=call.interpret, num_threads=2, thread_name="wg")
    return run(*ins)


def _forward_sides(scale: float, *, save: bool, transposed: bool) -> Callable:
    """The forward's two sides (`_pass`) for queries scale * q: outs = (o, then if `save` S_c and delta_c, the final
    state). If `transposed` (nothing saved; value blocks of 64: the wgmma rows) the carrier holds S^T [vb, dk], which
    lets the products after the first take their left operands from registers (fixed buffers `_forward_fixed_t`);
    else S [dk, vb], whose products go through shared memory (`_forward_fixed`), in the layouts the backward reads."""

    def sides(ops, at, outs, sl, fixed_refs, barriers):
        s_sm, delta_sm, o_sm = fixed_refs if transposed else (fixed_refs[0], *fixed_refs[2:])
        consumed, s_ready, s_free, d_ready, d_free = barriers
        chunk, cdt = ops.chunk, s_sm.dtype
        dk, vb = s_sm.shape[::-1] if transposed else s_sm.shape

        def publish_state(i, state):
            """S (or S^T) into shared memory once the output side has read the last chunk's."""
            @pl.when(i > 0)
            def _():  # (and delta, before it could arrive here)
                plgpu.barrier_wait(s_free.at[0])
                if save:
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the saved ones have left
            s_sm[...] = state.astype(cdt)
            plgpu.commit_smem()
            plgpu.barrier_arrive(s_ready.at[0])

        def publish_delta(i, delta, *more):
            """delta (or delta^T), with the (value, buffer) pairs of `more`, once the output side has used the
            last chunk's."""
            @pl.when(i > 0)
            def _():
                plgpu.barrier_wait(d_free.at[0])
            delta_sm[...] = delta.astype(cdt)
            for value, sm in more:
                sm[...] = value.astype(cdt)
            plgpu.commit_smem()
            plgpu.barrier_arrive(d_ready.at[0])

        def state_side(i, slot, state):
            """delta = Ag (v - d_in o k S);  S' = d_c S + k^T (d_out o delta)."""
            ch = ChunkGates.load(ops, sl.g, sl.seg, slot)
            k_s, x_sm = sl.k.at[slot], fixed_refs[1]
            publish_state(i, state)
            ks, decayed = ops.matmul((chunk, vb), (k_s, s_sm), during=lambda: state * ch.d_chunk)
            x_sm[...] = (ops.load(sl.tok.at[slot], WGMMA).astype(F32) - ch.rows_of(ch.d_in, vb) * ks).astype(cdt)
            plgpu.commit_smem()
            delta = ops.matmul((chunk, vb), (sl.ag.at[slot], x_sm))
            publish_delta(i, delta, (delta * ch.rows_of(ch.d_out, vb), x_sm))
            if save:
                plgpu.copy_smem_to_gmem(s_sm, outs[1].at[at.per_chunk(i)], commit_group=False)
                plgpu.copy_smem_to_gmem(delta_sm, outs[2].at[at.values(i)], commit_group=False)
                plgpu.commit_smem_to_gmem_group()
            state = ops.matmul((dk, vb), (("T", k_s), x_sm), init=decayed)
            plgpu.barrier_arrive(consumed.at[slot])
            return state

        def state_side_t(i, slot, state):
            """delta^T = v^T Ag^T - (d_in o (k S))^T Ag^T;  S^T' = d_c S^T + (d_out o delta)^T k, with d_in, d_out by
            column. What does not feed a product runs while one does: S^T's publishing and d_c S^T during S^T k^T
            (whose left operand is S^T's bf16 copy in registers), d_out during delta, delta's publishing during the
            update. Registers: one [vb, C] accumulator live at a time beside S^T, and the decays by column (a quarter
            of C values a thread, where a row vector is two) made late: d_in after S^T k^T (made during it, with
            S^T's copy live, ptxas spills 136 B)."""
            ch = ChunkGates.load(ops, sl.g, sl.seg, slot)
            k_s, ag_t = sl.k.at[slot], ("T", sl.ag.at[slot])

            def by_column(decay):  # loaded and formed at its use, to keep the column vectors' registers short-lived
                return ch.cols_of(decay(*ch.columns(sl.g, sl.seg, slot)), vb)

            s_bf = state.astype(cdt)

            def while_ks():
                publish_state(i, s_bf)
                return state * ch.d_chunk

            ks_t, decayed = ops.matmul((vb, chunk), (s_bf, ("T", k_s)), during=while_ks)
            neg_ks_t = (ks_t * -by_column(ch.d_in_of)).astype(cdt)
            delta, d_out = ops.matmul((vb, chunk), (("T", sl.tok.at[slot]), ag_t), (neg_ks_t, ag_t),
                                      during=lambda: by_column(ch.d_out_of))
            state = ops.matmul((vb, dk), ((delta * d_out).astype(cdt), k_s), init=decayed,
                               during=lambda: publish_delta(i, delta))
            plgpu.barrier_arrive(consumed.at[slot])
            return state

        def output_side(i, slot, carry):
            """o = d_in o (q S) + attn delta,  attn = (q k^T) o E, both times the scale. q k^T and attn first: they
            need no S, so they overlap the carrier's last update and its writing of S."""
            ch = ChunkGates.load(ops, sl.g, sl.seg, slot)
            g_j, s_j = ch.columns(sl.g, sl.seg, slot)
            q_s = sl.q.at[slot]
            qk, decay = ops.matmul((chunk, chunk), (q_s, ("T", sl.k.at[slot])),
                                   during=lambda: ch.decay(g_j, s_j) * scale)
            attn = (qk * decay).astype(cdt)
            plgpu.barrier_wait(s_ready.at[0])
            qs = ops.matmul((chunk, vb), (q_s, ("T", s_sm) if transposed else s_sm))
            plgpu.barrier_arrive(s_free.at[0])
            plgpu.barrier_arrive(consumed.at[slot])
            plgpu.barrier_wait(d_ready.at[0])
            o = ops.matmul((chunk, vb), (attn, ("T", delta_sm) if transposed else delta_sm),
                           init=qs * ch.rows_of(ch.d_in * scale, vb))
            plgpu.barrier_arrive(d_free.at[0])
            store(1, (o, o_sm, outs[0].at[at.in_sequence(i)]))
            return carry

        return state_side_t if transposed else state_side, output_side, [(s_free, 1), (d_free, 1)]

    return sides


def _reverse_sides(ops, at, outs, sl, fixed_refs, barriers, *, scale: float):
    """The reverse pass's two sides (`_pass`) for queries scale * q: outs = (G_{c+1} per chunk, D_c, G_0). With the
    keys and queries of the forward (k, q undecayed: d_out and d_in act on the [C, vb] factors) and w = Ag diag(d_in) k,
    D = attn^T o_bar + d_out o (k G) and G <- d_c G + q^T (d_in o o_bar) + k^T y, y = -d_in o (Ag^T D)."""
    g_sm, attn_t_sm, z_sm, d_sm, y_sm = fixed_refs
    consumed, attn_ready, d_ready, y_ready, free = barriers
    chunk, (dk, vb), cdt = ops.chunk, g_sm.shape, g_sm.dtype

    def carrier_side(i, slot, g):
        """D, then G for the chunk before (the carrier holds G)."""
        ch = ChunkGates.load(ops, sl.g, sl.seg, slot)
        k_s = sl.k.at[slot]
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's G and D have left
        g_sm[...] = g.astype(cdt)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(g_sm, outs[0].at[at.per_chunk(i)])
        plgpu.barrier_wait(attn_ready.at[0])
        kg, d = ops.matmuls(([(k_s, g_sm)], ops.zeros((chunk, vb))),
                            ([(attn_t_sm, sl.tok.at[slot])], ops.zeros((chunk, vb))))
        d_sm[...] = (d + ch.rows_of(ch.d_out, vb) * kg).astype(cdt)
        plgpu.commit_smem()
        plgpu.barrier_arrive(d_ready.at[0])
        plgpu.copy_smem_to_gmem(d_sm, outs[1].at[at.values(i)])
        decayed = g * ch.d_chunk  # while the other side forms y
        plgpu.barrier_wait(y_ready.at[0])
        g = ops.matmul((dk, vb), (("T", sl.q.at[slot]), z_sm), (("T", k_s), y_sm), init=decayed)

        @pl.when(i > 0)
        def _():  # attn^T, d_in o o_bar and y of this chunk are read (chunk 0 is the last)
            plgpu.barrier_arrive(free.at[0])
        plgpu.barrier_arrive(consumed.at[slot])
        return g

    def other_side(i, slot, carry):
        """attn^T = (k q^T) o E^T and d_in o o_bar for the carrier, then y = -d_in o (Ag^T D)."""
        ch = ChunkGates.load(ops, sl.g, sl.seg, slot)
        g_j, s_j = ch.columns(sl.g, sl.seg, slot)
        kq = ops.matmul((chunk, chunk), (sl.k.at[slot], ("T", sl.q.at[slot])))
        attn_t = (kq * ch.decay(g_j, s_j, transposed=True) * scale).astype(cdt)
        z = (ops.load(sl.tok.at[slot], WGMMA).astype(F32) * ch.rows_of(ch.d_in * scale, vb)).astype(cdt)

        @pl.when(i < at.n_chunks - 1)
        def _():  # the carrier is done with the last chunk's (chunk i + 1's)
            plgpu.barrier_wait(free.at[0])
        attn_t_sm[...] = attn_t
        z_sm[...] = z
        plgpu.commit_smem()
        plgpu.barrier_arrive(attn_ready.at[0])
        plgpu.barrier_wait(d_ready.at[0])
        y = ops.matmul((chunk, vb), (("T", sl.ag.at[slot]), d_sm)) * ch.rows_of(-ch.d_in, vb)
        y_sm[...] = y.astype(cdt)
        plgpu.commit_smem()
        plgpu.barrier_arrive(y_ready.at[0])
        plgpu.barrier_arrive(consumed.at[slot])
        return carry

    return carrier_side, other_side, []


GRAD_KB = 64  # key columns per CTA of the gradient pass: three [C, 64] fp32 accumulators


def _grad_slots(chunk, kb, vb, cdt, stages: int) -> list:
    """The gradient pass's inputs per TMA slot (a value block of `vb` columns): S_c and G_{c+1} [kb, vb], then
    o_bar_c, delta_c and D_c [C, vb], the wgmma operands."""
    return [smem((stages, kb, vb), cdt)] * 2 + [smem((stages, chunk, vb), cdt)] * 3


def _gradients(chunk: int, vb: int, stages: int, interpret, states, g_next, o_bar, deltas, d_deltas):
    """The gradients that only read the sequences, per chunk c (module docstring):

        q_bar = o_bar S_c^T,   w_bar = -D_c S_c^T,   k_bar = delta_c G_{c+1}^T,   d_bar by row = sum_v S_c o G_{c+1}

    states, g_next [X, n, dk, dv], o_bar [b, n*C, h, dv] (X = b h), deltas and d_deltas [X, n*C, dv], in the
    operand dtype. One CTA per (key block of GRAD_KB rows, chunk, row) walks the value blocks (TMA `stages`
    ahead; the key blocks of a chunk are neighbours in the launch order, so its [C, dv] inputs are read from L2
    after the first). Returns
    q_bar, w_bar, k_bar [X, n*C, dk] fp32 and d_bar per state row [X, n, dk] fp32 (the caller sums it over dk)."""
    rows_, n, dk, dv = states.shape
    cdt, kb, heads = states.dtype, min(GRAD_KB, dk), o_bar.shape[2]
    ops = Ops(bool(interpret), chunk)
    slot_buffers = functools.partial(_grad_slots, chunk, kb, vb, cdt)
    outs = [smem((chunk, kb), F32)] * 3 + [vectors((kb,))]
    stages = fit(slot_buffers, [], stages, dv // vb, "GDN gradient", interpret)

    def kernel(s_ref, g_ref, ob_ref, delta_ref, dd_ref, q_out, w_out, k_out, dec_out):
        keys, c, row = (lax.axis_index(a) for a in ("kblocks", "chunks", "rows"))
        keys, tokens = pl.ds(keys * kb, kb), pl.ds(c * chunk, chunk)

        def loop(s_sm, g_sm, ob_sm, delta_sm, dd_sm, ready):
            def by_state(j):
                return row, c, keys, pl.ds(j * vb, vb)

            def by_token(j):
                return row, tokens, pl.ds(j * vb, vb)

            def in_sequence(j):
                return row // heads, tokens, row % heads, pl.ds(j * vb, vb)

            sources = [(s_ref, s_sm, by_state), (g_ref, g_sm, by_state), (ob_ref, ob_sm, in_sequence),
                       (delta_ref, delta_sm, by_token), (dd_ref, dd_sm, by_token)]

            def step(j, slot, carry):
                q_bar, w_bar, k_bar, dec = carry
                s_s, g_s = s_sm.at[slot], g_sm.at[slot]
                q_bar, w_bar, k_bar = ops.matmuls(([(ob_sm.at[slot], ("T", s_s))], q_bar),
                                                  ([(dd_sm.at[slot], ("T", s_s))], w_bar),
                                                  ([(delta_sm.at[slot], ("T", g_s))], k_bar))
                dec = dec + ops.load(s_s, WGMMA).astype(F32) * ops.load(g_s, WGMMA).astype(F32)
                plgpu.commit_smem()  # a warpgroup barrier: every warp is done with the slot before its refill
                return q_bar, w_bar, k_bar, dec

            carry = (*(ops.zeros((chunk, kb)) for _ in range(3)), ops.zeros((kb, vb)))
            return chunk_loop(step, carry, sources=sources, ready=ready, stages=stages, n_chunks=dv // vb,
                              reverse=False)

        q_bar, w_bar, k_bar, dec = pl.run_scoped(loop, *slot_buffers(stages),
                                                 plgpu.Barrier(num_arrivals=5, num_barriers=stages))

        send([(q_bar, q_out.at[row, tokens, keys]), (-w_bar, w_out.at[row, tokens, keys]),
              (k_bar, k_out.at[row, tokens, keys]), (jnp.sum(dec, axis=1), dec_out.at[row, c, keys])], outs)

    per_token = jax.ShapeDtypeStruct((rows_, n * chunk, dk), F32)
    run = gpu_kernel(kernel, "gdn_gradients", out_type=(per_token,) * 3 + (jax.ShapeDtypeStruct((rows_, n, dk), F32),),
                     grid=(dk // kb, n, rows_), grid_names=("kblocks", "chunks", "rows"), interpret=interpret)
    return run(states, g_next, o_bar, deltas, d_deltas)


def _value_gradients(chunk: int, vb: int, stages: int, interpret, ag, v, o_bar, deltas, d_deltas):
    """The cotangents that only read the values, per chunk c (those of attn and of u = Ag v, with u_bar = D_c):

        attn_bar = o_bar_c delta_c^T,   Ag_bar = D_c v_c^T,   v_bar = Ag_c^T D_c

    ag [X, n*C, C], deltas and d_deltas [X, n*C, dv] (X = b h) and v, o_bar [b, n*C, h, dv], in the operand dtype.
    One CTA per (chunk, row) walks the value blocks (TMA `stages` ahead), the [C, C] sums in registers. Returns
    attn_bar, Ag_bar [X, n*C, C] fp32 and v_bar [b, n*C, h, dv] in the operand dtype, written in v's layout."""
    rows_, tp, _ = ag.shape
    n, dv, heads, cdt = tp // chunk, v.shape[-1], v.shape[2], ag.dtype
    ops, sw = Ops(bool(interpret), chunk), _swizzle(vb, cdt)

    def slot_buffers(stages):  # v, o_bar, delta, D
        return [smem((stages, chunk, vb), cdt, sw)] * 4

    fixed = [smem((chunk, chunk), cdt, sw), smem((2, chunk, vb), cdt)]  # Ag; v_bar on its way out, two slots
    stages = fit(slot_buffers, fixed, stages, dv // vb, "GDN value gradient", interpret)

    def kernel(ag_ref, v_ref, ob_ref, delta_ref, dd_ref, attn_out, agb_out, vbar_out):
        row, tokens = lax.axis_index("rows"), pl.ds(lax.axis_index("chunks") * chunk, chunk)

        def in_sequence(j):
            return row // heads, tokens, row % heads, pl.ds(j * vb, vb)

        def by_token(j):
            return row, tokens, pl.ds(j * vb, vb)

        def loop(ag_sm, out_sm, v_sm, ob_sm, delta_sm, dd_sm, ready, ag_ready):
            plgpu.copy_gmem_to_smem(ag_ref.at[row, tokens], ag_sm, ag_ready)
            plgpu.barrier_wait(ag_ready)
            sources = [(v_ref, v_sm, in_sequence), (ob_ref, ob_sm, in_sequence), (delta_ref, delta_sm, by_token),
                       (dd_ref, dd_sm, by_token)]

            def step(j, slot, sums):
                dd_s = dd_sm.at[slot]
                attn_bar, ag_bar, v_bar = ops.matmuls(([(ob_sm.at[slot], ("T", delta_sm.at[slot]))], sums[0]),
                                                      ([(dd_s, ("T", v_sm.at[slot]))], sums[1]),
                                                      ([(("T", ag_sm), dd_s)], ops.zeros((chunk, vb))))
                # (store's commit_smem is a warpgroup barrier: every warp is done with the slot before its refill)
                store(2, (v_bar, out_sm.at[lax.rem(j, 2)], vbar_out.at[in_sequence(j)]))
                return attn_bar, ag_bar

            sums = chunk_loop(step, (ops.zeros((chunk, chunk)),) * 2, sources=sources, ready=ready, stages=stages,
                              n_chunks=dv // vb, reverse=False)
            plgpu.wait_smem_to_gmem(0)
            return sums

        sums = pl.run_scoped(loop, *fixed, *slot_buffers(stages), plgpu.Barrier(num_arrivals=4, num_barriers=stages),
                             plgpu.Barrier())

        send([(value, out.at[row, tokens]) for value, out in zip(sums, (attn_out, agb_out))],
             [smem((chunk, chunk), F32)] * 2)

    square = jax.ShapeDtypeStruct((rows_, tp, chunk), F32)
    run = gpu_kernel(kernel, "gdn_value_gradients", out_type=(square, square, jax.ShapeDtypeStruct(v.shape, cdt)),
                     grid=(n, rows_), grid_names=("chunks", "rows"), interpret=interpret)
    return run(ag, v, o_bar, deltas, d_deltas)


class Kernels(NamedTuple):
    """The passes in the chunked layout of `gated_delta._chunked` (ag [b, h, n, C, C]; G [b, h, n, C] fp32; states
    [b, h, dk, dv]), except q, k, v, o and o_bar, which are in the op's own layout [b, n*C, h, d] (no transposes on
    either side), and the segment index within the chunk, [b, n*C] fp32 (None: no resets; the passes then load
    no index and mask nothing). What
    goes in and out per chunk or token is in the operand dtype, the initial and final states and their cotangents
    fp32:

    forward(ag, v, k, q, g, seg, state) -> (o in the operand dtype, final state) (state None: zeros, not loaded);
    forward_saving(...same) -> (o, final state, S_c per chunk [b, h, n, dk, dv], delta_c [b, h, n, C, dv]);
    reverse(ag, k, q, g, seg, o_bar, final_bar) -> (G_0, G_{c+1} per chunk, D_c);
    gradients(states, g_next, o_bar, deltas, d_deltas) -> (q_bar, w_bar, k_bar [b, h, n, C, dk], decay_bar
    [b, h, n]), all fp32 (`_gradients`), for the decayed q, k and w of `gated_delta._recurrence_inputs`;
    values(ag, v, o_bar, deltas, d_deltas) -> (attn_bar, Ag_bar [b, h, n, C, C] fp32, v_bar) (`_value_gradients`);
    keys(q, k, t, beta, g, seg, q_bar, w_bar, k_bar, attn_bar, ag_bar) -> (q's and k's cotangents, then the vectors
    of `mosaic_gdn_keys.VECTORS` [b, h, n, C] fp32) (`mosaic_gdn_keys.key_gradients`; t, beta, g in the chunked
    layout, fp32)."""

    forward: Callable
    forward_saving: Callable
    reverse: Callable
    gradients: Callable
    values: Callable
    keys: Callable


def kernels(dtype, interpret=None, vb: int | None = None, stages: int = 2, scale: float = 1.0) -> Kernels:
    """The passes of this module with matmul operands in `dtype` (`Kernels`) for the queries scale * q (the scale
    applied in the kernels: no pass over q before them); `vb` sets the value block of the forward and the reverse
    pass (default `value_block`). The forward alone carries S^T where its value blocks are 64 columns (wgmma rows;
    `_forward_sides`), S elsewhere."""

    def block_of(rows_: int, dv: int) -> int:
        return vb or value_block(rows_, dv, grid_cores(interpret))

    def run(ag, tok, k, q, g, seg, start, name, sides, fixed, out_type, reverse, transposed=False):
        """`start` [b, h, dk, dv], or [b, h, dv, dk] if `transposed`, or None: zeros (`_pass`)."""
        b, h, n, c, _ = ag.shape
        dk, dv = k.shape[-1], tok.shape[-1]
        carried = (b * h, dv, dk) if transposed else (b * h, dk, dv)
        block = block_of(b * h, dv)
        if reason := unsupported(dk, dv, c, device_dtype(dtype, interpret), block):
            raise ValueError(f"Mosaic GPU GDN kernels: {reason}")
        sds = jax.ShapeDtypeStruct
        types = [sds(shape, dtype) for shape in out_type(b * h, n, c, dk, dv)] + [sds(carried, F32)]
        return _pass(_Call(c, block, stages, interpret, h), name, sides, fixed,
                     (*operands(ag), *(x.astype(dtype) for x in (tok, k, q)), g.reshape(b * h, n * c).astype(F32),
                      None if seg is None else seg.astype(F32), None if start is None else rows(start).astype(F32)),
                     types, reverse=reverse,
                     transposed=transposed)

    def operands(*xs):
        return tuple(seq_rows(x).astype(dtype) for x in xs)

    def forward_pass(ag, v, k, q, g, seg, state, save):
        b, h, n, c, _ = ag.shape
        transposed = not save and block_of(b * h, v.shape[-1]) % 64 == 0

        def out_type(x, n, c, dk, dv):
            return [(b, n * c, h, dv)] + ([(x, n, dk, dv), (x, n * c, dv)] if save else [])

        if transposed and state is not None:
            state = jnp.swapaxes(state, -1, -2)
        o, *saved, final = run(ag, v, k, q, g, seg, state, "gdn_forward_train" if save else "gdn_forward",
                               _forward_sides(scale, save=save, transposed=transposed),
                               _forward_fixed_t if transposed else _forward_fixed, out_type, reverse=False,
                               transposed=transposed)
        final = final.reshape(b, h, *final.shape[1:])
        if not save:
            return o, jnp.swapaxes(final, -1, -2) if transposed else final
        return o, final, saved[0].reshape(b, h, *saved[0].shape[1:]), saved[1].reshape(b, h, n, c, -1)

    def reverse(ag, k, q, g, seg, o_bar, final_bar):
        b, h, n, c, _ = ag.shape
        g_next, d, g0 = run(ag, o_bar, k, q, g, seg, final_bar, "gdn_reverse",
                            functools.partial(_reverse_sides, scale=scale), _reverse_fixed,
                            lambda x, n, c, dk, dv: [(x, n, dk, dv), (x, n * c, dv)], reverse=True)
        return g0.reshape(final_bar.shape), g_next.reshape(b, h, *g_next.shape[1:]), d.reshape(b, h, n, c, -1)

    def gradients(states, g_next, o_bar, deltas, d_deltas):
        b, h, n, c, dv = deltas.shape
        dk = states.shape[-2]
        q_bar, w_bar, k_bar, dec = _gradients(c, min(64, dv), stages, interpret, rows(states).astype(dtype),
                                              rows(g_next).astype(dtype), o_bar.astype(dtype),
                                              *operands(deltas, d_deltas))
        return (*(x.reshape(b, h, n, c, dk) for x in (q_bar, w_bar, k_bar)), jnp.sum(dec, -1).reshape(b, h, n))

    def values(ag, v, o_bar, deltas, d_deltas):
        b, h, n, c, dv = deltas.shape
        attn_bar, ag_bar, v_bar = _value_gradients(c, min(64, dv), stages, interpret, *operands(ag),
                                                   v.astype(dtype), o_bar.astype(dtype), *operands(deltas, d_deltas))
        return attn_bar.reshape(b, h, n, c, c), ag_bar.reshape(b, h, n, c, c), v_bar

    def keys(q, k, t, beta, g, seg, q_bar, w_bar, k_bar, attn_bar, ag_bar):
        b, h, n, c, _ = t.shape
        dq, dk, *vectors_ = mosaic_gdn_keys.key_gradients(
            q.astype(dtype), k.astype(dtype), seq_rows(t), *(x.reshape(b * h, n * c) for x in (beta, g)),
            jnp.zeros((b, n * c), F32) if seg is None else seg.astype(F32),  # (no resets: all in segment 0)
            *(seq_rows(x) for x in (q_bar, w_bar, k_bar, attn_bar, ag_bar)), chunk=c, scale=scale,
            stages=stages, interpret=interpret)
        return dq, dk, *(x.reshape(b, h, n, c) for x in vectors_)

    return Kernels(functools.partial(forward_pass, save=False), functools.partial(forward_pass, save=True), reverse,
                   gradients, values, keys)
