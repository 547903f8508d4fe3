"""Mosaic GPU (Hopper: wgmma, TMA) kernels for the sequential part of the chunked gated delta rule together with
the outputs it feeds (`gated_delta._outputs`): over chunks c, with u, w, the decayed keys k and queries q, the
chunk weights attn and each chunk's decay d_c from the rest of the rule (`gated_delta._chunked`),

    delta_c = u_c - w_c S_c,   o_c = q_c S_c + attn_c delta_c,   S_{c+1} = d_c S_c + k_c^T delta_c       (forward)

and, backward (c descending, G the cotangent of S_{c+1}, from the final state's; o_bar the outputs'),

    D_c = attn_c^T o_bar_c + k_c G,   G <- q_c^T o_bar_c + d_c G - w_c^T D_c                          (reverse)

so the cotangents of the per-chunk states and deltas never exist as arrays. One CTA of one warpgroup per
(batch*head, value block of `vb` columns) carries its [dk, vb] block of the fp32 state (or G) in registers
(the wgmma accumulator layout). w_c, k_c, attn_c and u_c (or o_bar_c) arrive by TMA `stages` chunks ahead; q_c
has one buffer, fetched again once the chunk's last product has read it (two slots of it do not fit next to w
and k at d_k 256). The forward may also send out what the backward and the remaining gradients need: the
state entering each chunk and delta_c, both the wgmma operands already. The reverse pass sends out G entering
each chunk's end and D_c (= u_bar). Everything read and sent is in the operand dtype (bf16 for bf16 layers, as
fla's kernels keep u, w and the chunk states; their consumers multiply in that dtype anyway); the carried state
and every accumulation are fp32. The initial and final states pass through a shared-memory buffer of their own
scope, so the chunk loop can take the space.

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

from .mosaic_common import (
    F32,
    SMEM_BYTES,
    WGMMA,
    Ops,
    carry_state,
    chunk_loop,
    device_dtype,
    dtype_reason,
    fit,
    gpu_kernel,
    nbytes,
    smem,
    vectors,
)
from .pallas_gdn import chunk_rows as rows
from .pallas_gdn import seq_rows

TMA_BOX = 256  # the most elements a TMA box takes along one dimension


def unsupported(dk: int, dv: int, chunk: int, vb: int, dtype) -> str | None:
    """Why the kernels cannot take this shape (None if they can)."""
    if reason := dtype_reason(dtype):
        return reason
    if dk % 64 or chunk % 64 or dk > TMA_BOX or chunk > TMA_BOX:
        return f"d_k={dk} and chunk_size={chunk} must be multiples of 64 (wgmma rows), at most {TMA_BOX} (TMA)"
    if dv % vb or vb % 16 or vb > 128:
        return f"value block {vb} must divide d_v={dv} and be a multiple of 16, at most 128"
    if dk * vb > 256 * 64:
        return f"state block {dk} x {vb} too large for one warpgroup's registers"
    need = nbytes(_slots(chunk, dk, vb, dtype, 1) + _fixed(chunk, dk, vb, dtype))
    if need > SMEM_BYTES:
        return f"chunk {chunk}, d_k {dk}, value block {vb}: {need} B of shared memory > {SMEM_BYTES}"
    return None


def default_vb(dv: int) -> int:
    """32 columns: a [256, 32] fp32 state block is 64 registers a thread."""
    return min(32, dv)


def _swizzle(vb: int, cdt) -> int:
    """The swizzle of every wgmma operand: the state block's rows ([dk, vb]) set it, and a wgmma's operands
    share one."""
    return min(128, vb * jnp.dtype(cdt).itemsize)


def _slots(chunk, dk, vb, cdt, stages: int) -> list:
    """Per TMA slot: w_c, k_c, the decay (a [C] vector), attn_c, and u_c or o_bar_c."""
    sw = _swizzle(vb, cdt)
    return [smem((stages, chunk, dk), cdt, sw), smem((stages, chunk, dk), cdt, sw), vectors((stages, chunk)),
            smem((stages, chunk, chunk), cdt, sw), smem((stages, chunk, vb), cdt, sw)]


def _fixed(chunk, dk, vb, cdt) -> list:
    """q_c (one buffer); the carried block (S or G) as an operand, which is also what is sent out per chunk; the
    chunk's [C, vb] result (delta_c, sent out when saved, or -D_c) as an operand; then the forward's o_c or the
    reverse pass's D_c on its way out."""
    sw = _swizzle(vb, cdt)
    return [smem((chunk, dk), cdt, sw), smem((dk, vb), cdt, sw), smem((chunk, vb), cdt, sw), smem((chunk, vb), cdt)]


@dataclasses.dataclass(frozen=True)
class _Call:
    chunk: int
    vb: int
    stages: int
    interpret: object
    heads: int  # o and o_bar are in the op's [b, n*C, h, dv] layout: row = batch * heads + head


def _pass(call: _Call, step_of: Callable, outs: tuple, ins: tuple, *, backward: bool):
    """One pass over the chunks (forward, or in reverse if `backward`) of a grid of (row, value block) CTAs.
    `ins` = (w, k, decay, attn, the per-token input (forward: u [X, n*C, dv]; backward: o_bar [b, n*C, h, dv]), q,
    the carried block's start [X, dk, dv]);
    `outs` the output types, the final carried block last; `step_of(refs) -> step(i, slot, carry)`."""
    w, _, _, _, _, _, state = ins
    rows_, tp, dk = w.shape
    dv, chunk, vb, cdt = state.shape[-1], call.chunk, call.vb, w.dtype
    n_chunks = tp // chunk
    ops = Ops(bool(call.interpret), chunk)
    slot_buffers = functools.partial(_slots, chunk, dk, vb, cdt)
    fixed = _fixed(chunk, dk, vb, cdt)
    stages = fit(slot_buffers, fixed, call.stages, n_chunks, "GDN " + ("reverse" if backward else "forward"),
                 call.interpret)

    def kernel(w_ref, k_ref, d_ref, attn_ref, tok_ref, q_ref, state_ref, *out_refs):
        row, vblock = lax.axis_index("rows"), pl.ds(lax.axis_index("vblocks") * vb, vb)

        def chunk_rows(i):
            return row, pl.ds(i * chunk, chunk)

        def in_sequence(i):  # o, o_bar [b, n*C, h, dv]
            return row // call.heads, pl.ds(i * chunk, chunk), row % call.heads, vblock

        def loop(state, w_sm, k_sm, d_sm, attn_sm, tok_sm, q_sm, carried_sm, result_sm, out_sm, ready, q_ready):
            refs = _Refs(ops, cdt, n_chunks, row, vblock, chunk_rows, in_sequence, q_ref, out_refs, w_sm, k_sm, d_sm,
                         attn_sm, tok_sm, q_sm, q_ready, carried_sm, result_sm, out_sm)
            tokens = in_sequence if backward else (lambda i: (*chunk_rows(i), vblock))  # o_bar, or u by rows
            sources = [(w_ref, w_sm, chunk_rows), (k_ref, k_sm, chunk_rows), (d_ref, d_sm, chunk_rows),
                       (attn_ref, attn_sm, chunk_rows), (tok_ref, tok_sm, tokens)]
            state = chunk_loop(step_of(refs), state, sources=sources, ready=ready, stages=stages,
                               n_chunks=n_chunks, reverse=backward)
            plgpu.wait_smem_to_gmem(0)
            return state

        carry_state(ops, state_ref.at[row, :, vblock], out_refs[-1].at[row, :, vblock], loop,
                     [*slot_buffers(stages), *fixed, plgpu.Barrier(num_arrivals=len(slot_buffers(1)),
                                                                  num_barriers=stages), plgpu.Barrier()])

    run = gpu_kernel(kernel, "gdn_" + ("reverse" if backward else "forward"), out_type=outs, grid=(rows_, dv // vb),
                     grid_names=("rows", "vblocks"), interpret=call.interpret)
    return run(*ins)


@dataclasses.dataclass(frozen=True)
class _Refs:
    """What a chunk step reads and writes: the settings, the CTA's place, the HBM outputs and the shared memory
    (`_slots`' slots, q and its barrier, then `_fixed`'s carried block, [C, vb] result and staging buffers)."""

    ops: Ops
    cdt: object
    n_chunks: int
    row: object
    vblock: object
    chunk_rows: Callable
    in_sequence: Callable
    q_ref: object
    outs: tuple
    w: object
    k: object
    d: object
    attn: object
    tok: object
    q: object
    q_ready: object
    carried: object
    result: object
    out: object

    def fetch_q(self, i) -> None:
        plgpu.copy_gmem_to_smem(self.q_ref.at[self.chunk_rows(i)], self.q, self.q_ready)

    def per_token(self, i):  # [X, n*C, dv] outputs
        return (*self.chunk_rows(i), self.vblock)

    def per_chunk(self, i):  # [X, n, dk, dv] outputs
        return self.row, i, slice(None), self.vblock


def _forward_step(r: _Refs, save: bool):
    """delta = u - w S;  o = q S + attn delta;  S' = d S + k^T delta (module docstring)."""
    ops, chunk, vb = r.ops, r.ops.chunk, r.tok.shape[-1]

    def step(i, slot, state):
        @pl.when(i == 0)
        def _():
            r.fetch_q(0)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's copies out have left
        r.carried[...] = state.astype(r.cdt)
        plgpu.commit_smem()
        delta = ops.load(r.tok.at[slot], WGMMA).astype(F32) - ops.matmul((chunk, vb), (r.w.at[slot], r.carried))
        r.result[...] = delta.astype(r.cdt)
        plgpu.commit_smem()
        plgpu.barrier_wait(r.q_ready)
        o, state = ops.matmuls(([(r.q, r.carried), (r.attn.at[slot], r.result)], ops.zeros((chunk, vb))),
                               ([(("T", r.k.at[slot]), r.result)], state * r.d[slot, 0]))  # waited for once
        r.out[...] = o.astype(r.cdt)
        plgpu.commit_smem()  # (and every warp is past the product that read q)
        plgpu.copy_smem_to_gmem(r.out, r.outs[0].at[r.in_sequence(i)], commit_group=False)
        if save:
            plgpu.copy_smem_to_gmem(r.carried, r.outs[1].at[r.per_chunk(i)], commit_group=False)
            plgpu.copy_smem_to_gmem(r.result, r.outs[2].at[r.per_token(i)], commit_group=False)
        plgpu.commit_smem_to_gmem_group()

        @pl.when(i + 1 < r.n_chunks)
        def _():
            r.fetch_q(i + 1)

        return state

    return step


def _reverse_step(r: _Refs):
    """D = attn^T o_bar + k G;  G <- q^T o_bar + d G - w^T D (module docstring)."""
    ops, chunk, vb, dk = r.ops, r.ops.chunk, r.tok.shape[-1], r.w.shape[-1]

    def step(i, slot, g):
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's copies out have left
        r.carried[...] = g.astype(r.cdt)
        plgpu.commit_smem()  # (and every warp is past the last chunk's product that read q)
        r.fetch_q(i)
        o_bar = r.tok.at[slot]
        d = ops.matmul((chunk, vb), (("T", r.attn.at[slot]), o_bar), (r.k.at[slot], r.carried))
        r.out[...] = d.astype(r.cdt)
        r.result[...] = (-d).astype(r.cdt)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(r.carried, r.outs[0].at[r.per_chunk(i)], commit_group=False)
        plgpu.copy_smem_to_gmem(r.out, r.outs[1].at[r.per_token(i)], commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.barrier_wait(r.q_ready)
        return ops.matmul((dk, vb), (("T", r.q), o_bar), (("T", r.w.at[slot]), r.result), init=g * r.d[slot, 0])

    return step


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

        def send(q_sm, w_sm, k_sm, dec_sm):
            for value, sm in ((q_bar, q_sm), (-w_bar, w_sm), (k_bar, k_sm)):
                sm[...] = value
            dec_sm[...] = jnp.sum(dec, axis=1)
            plgpu.commit_smem()
            for sm, dst in ((q_sm, q_out), (w_sm, w_out), (k_sm, k_out)):
                plgpu.copy_smem_to_gmem(sm, dst.at[row, tokens, keys], commit_group=False)
            plgpu.copy_smem_to_gmem(dec_sm, dec_out.at[row, c, keys], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(send, *outs)

    per_token = jax.ShapeDtypeStruct((rows_, n * chunk, dk), F32)
    run = gpu_kernel(kernel, "gdn_gradients", out_type=(per_token,) * 3 + (jax.ShapeDtypeStruct((rows_, n, dk), F32),),
                     grid=(dk // kb, n, rows_), grid_names=("kblocks", "chunks", "rows"), interpret=interpret)
    return run(states, g_next, o_bar, deltas, d_deltas)


class Kernels(NamedTuple):
    """The four passes in the chunked layout of `gated_delta._chunked` (u [b, h, n, C, dv]; w, k, q
    [b, h, n, C, dk]; attn [b, h, n, C, C]; decay [b, h, n]; states [b, h, dk, dv]), except o and o_bar, which are
    in the op's own layout [b, n*C, h, dv] (no transposes on either side). What goes in and out per
    chunk or token is in the operand dtype, the initial and final states and their cotangents fp32:

    forward(u, w, k, decay, state, q, attn) -> (o in the operand dtype, final state);
    forward_saving(...same) -> (o, final state, S_c per chunk [b, h, n, dk, dv], delta_c);
    reverse(w, k, decay, q, attn, o_bar, final_bar) -> (G_0, G_{c+1} per chunk, D_c);
    gradients(states, g_next, o_bar, deltas, d_deltas) -> (q_bar, w_bar, k_bar [b, h, n, C, dk], decay_bar
    [b, h, n]), all fp32 (`_gradients`)."""

    forward: Callable
    forward_saving: Callable
    reverse: Callable
    gradients: Callable


def kernels(dtype, interpret=None, vb: int | None = None, stages: int = 2) -> Kernels:
    """The passes of this module with matmul operands in `dtype` (`Kernels`)."""

    def settings(c, dk, dv, heads) -> _Call:
        block = vb or default_vb(dv)
        if reason := unsupported(dk, dv, c, block, device_dtype(dtype, interpret)):
            raise ValueError(f"Mosaic GPU GDN kernels: {reason}")
        return _Call(c, block, stages, interpret, heads)

    def operands(*xs):
        return tuple(seq_rows(x).astype(dtype) for x in xs)

    def decay_rows(decay, c):  # [b, h, n] -> [b*h, n*C]: each chunk's decay repeated over its tokens
        return jnp.repeat(rows(decay).astype(F32), c, axis=-1)

    def forward_pass(u, w, k, decay, state, q, attn, save):
        b, h, n, c, dv = u.shape
        call = settings(c, w.shape[-1], dv, h)
        x, tp, dk = b * h, n * c, w.shape[-1]
        sds = jax.ShapeDtypeStruct
        outs = [sds((b, tp, h, dv), dtype)]
        if save:
            outs += [sds((x, n, dk, dv), dtype), sds((x, tp, dv), dtype)]
        w_, k_, q_, attn_, u_ = operands(w, k, q, attn, u)
        outs = _pass(call, functools.partial(_forward_step, save=save), (*outs, sds((x, dk, dv), F32)),
                     (w_, k_, decay_rows(decay, c), attn_, u_, q_, rows(state).astype(F32)), backward=False)
        o, *saved, final = outs
        final = final.reshape(state.shape)
        if not save:
            return o, final
        return o, final, saved[0].reshape(b, h, *saved[0].shape[1:]), saved[1].reshape(u.shape)

    def reverse(w, k, decay, q, attn, o_bar, final_bar):
        (b, h, n, c, dk), dv = w.shape, o_bar.shape[-1]
        call = settings(c, dk, dv, h)
        x, tp = b * h, n * c
        sds = jax.ShapeDtypeStruct
        w_, k_, q_, attn_ = operands(w, k, q, attn)
        o_bar_ = o_bar.astype(dtype)
        g_next, d, g0 = _pass(call, _reverse_step,
                              (sds((x, n, dk, dv), dtype), sds((x, tp, dv), dtype), sds((x, dk, dv), F32)),
                              (w_, k_, decay_rows(decay, c), attn_, o_bar_, q_, rows(final_bar).astype(F32)),
                              backward=True)
        return g0.reshape(final_bar.shape), g_next.reshape(b, h, *g_next.shape[1:]), d.reshape(b, h, n, c, dv)

    def gradients(states, g_next, o_bar, deltas, d_deltas):
        b, h, n, c, dv = deltas.shape
        dk = states.shape[-2]
        q_bar, w_bar, k_bar, dec = _gradients(c, min(64, dv), stages, interpret, rows(states).astype(dtype),
                                              rows(g_next).astype(dtype), o_bar.astype(dtype),
                                              *operands(deltas, d_deltas))
        return (*(x.reshape(b, h, n, c, dk) for x in (q_bar, w_bar, k_bar)), jnp.sum(dec, -1).reshape(b, h, n))

    return Kernels(functools.partial(forward_pass, save=False), functools.partial(forward_pass, save=True), reverse,
                   gradients)
