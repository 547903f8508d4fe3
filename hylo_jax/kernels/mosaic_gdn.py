"""Mosaic GPU (Hopper: wgmma, TMA) kernels for the sequential part of the chunked gated delta rule, the
chunk-state recurrence of `gated_delta.make_recurrence` (the same contract as `pallas_gdn.scans`):

    delta_c = u_c - w_c S_c,      S_{c+1} = d_c S_c + k_c^T delta_c              (forward)
    D_c = delta_bar_c + k_c G_{c+1},  G_c = S_bar_c + d_c G_{c+1} - w_c^T D_c     (backward, c descending)

One CTA of one warpgroup per (batch*head, value block of `vb` columns) carries its [dk, vb] block of the fp32
state in registers (the wgmma accumulator layout); per chunk two wgmmas: w_c S_c with the state stored in the
operand dtype (which is also the per-chunk state the backward reads, sent out by TMA), and k_c^T delta_c with
k read transposed from shared memory. w_c, k_c (and u_c, or the backward's cotangents) arrive by TMA
`stages` chunks ahead. The initial and final states pass through a shared-memory buffer of their own scope,
so the chunk loop's slots can take the space. Everything else of the rule stays in XLA (`gated_delta`).
"""

from __future__ import annotations

import dataclasses
import functools

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
    chunk_loop,
    device_dtype,
    dtype_reason,
    fit,
    load_state,
    nbytes,
    smem,
    store_state,
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
    need = max(nbytes(_slots(chunk, dk, vb, dtype, True, 1) + _fixed(chunk, dk, vb, dtype)),
               nbytes(_output_slots(chunk, dk, vb, dtype, 1) + _output_fixed(chunk, dk, vb, dtype)))
    if need > SMEM_BYTES:
        return f"chunk {chunk}, d_k {dk}, value block {vb}: {need} B of shared memory > {SMEM_BYTES}"
    return None


def _swizzle(vb: int, cdt) -> int:
    """The swizzle of every wgmma operand: the state block's rows ([dk, vb]) set it, and a wgmma's operands
    share one."""
    return min(128, vb * jnp.dtype(cdt).itemsize)


def _slots(chunk, dk, vb, cdt, backward: bool, stages: int) -> list:
    """Per TMA slot: w_c, k_c, the decay (as a [C] vector), u_c (forward) or S_bar_c and delta_bar_c
    (backward)."""
    sw = _swizzle(vb, cdt)
    buffers = [smem((stages, chunk, dk), cdt, sw), smem((stages, chunk, dk), cdt, sw), vectors((stages, chunk))]
    if backward:
        buffers.append(smem((stages, dk, vb), cdt, sw))
    return buffers + [smem((stages, chunk, vb), F32)]


def _fixed(chunk, dk, vb, cdt) -> list:
    """The outputs: the state (or G_{c+1}) in the operand dtype, two deep (it is the first wgmma's operand, so
    it is written first thing in a step, while the last step's copy may still read the other); delta_c (or
    D_c) in fp32, one deep (written after a wgmma, by when the last copy has left); and delta_c (or D_c) in the
    operand dtype for the second wgmma."""
    sw = _swizzle(vb, cdt)
    return [smem((2, dk, vb), cdt, sw), smem((chunk, vb), F32), smem((chunk, vb), cdt, sw)]


@dataclasses.dataclass(frozen=True)
class _Call:
    chunk: int
    vb: int
    stages: int
    interpret: object


def _scan(call: _Call, w, k, decay, seq, per_chunk, state, *, backward: bool):
    """One pass: w, k [X, n*C, dk] (operand dtype), decay [X, n*C] (each chunk's d_c repeated), `seq` [X, n*C,
    dv] fp32 (u, or delta_bar), `per_chunk` [X, n, dk, dv] (S_bar; None forward), `state` [X, dk, dv] fp32 (S_0,
    or G_n). Returns (per-chunk states [X, n, dk, dv] in the operand dtype, [X, n*C, dv] fp32, final state)."""
    rows, tp, dk = w.shape
    dv, chunk, vb, cdt = state.shape[-1], call.chunk, call.vb, w.dtype
    n_chunks = tp // chunk
    ops = Ops(bool(call.interpret), chunk)
    slot_buffers = functools.partial(_slots, chunk, dk, vb, cdt, backward)
    fixed = _fixed(chunk, dk, vb, cdt)
    stages = fit(slot_buffers, fixed, call.stages, n_chunks, "GDN recurrence", call.interpret)

    def kernel(w_ref, k_ref, d_ref, seq_ref, *refs):
        per_chunk_ref, state_ref, states_out, seq_out, final_out = refs if backward else (None, *refs)
        row, vblock = lax.axis_index("rows"), pl.ds(lax.axis_index("vblocks") * vb, vb)

        def tokens(i):
            return pl.ds(i * chunk, chunk)

        def loop(state, w_sm, k_sm, d_sm, *rest):
            per_chunk_sm, seq_sm, st_sm, out_sm, op_sm, ready = rest if backward else (None, *rest)
            sources = [(w_ref, w_sm, lambda i: (row, tokens(i))), (k_ref, k_sm, lambda i: (row, tokens(i))),
                       (d_ref, d_sm, lambda i: (row, tokens(i)))]
            if backward:
                sources.append((per_chunk_ref, per_chunk_sm, lambda i: (row, i, slice(None), vblock)))
            sources.append((seq_ref, seq_sm, lambda i: (row, tokens(i), vblock)))

            def step(i, slot, state):
                w_s, k_s, st_s = w_sm.at[slot], k_sm.at[slot], st_sm.at[lax.rem(i, 2)]
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the copy out of st_s two steps ago has left
                st_s[...] = state.astype(cdt)
                plgpu.commit_smem()
                # forward: delta = u - w S;  backward: D = delta_bar + k G
                first = ops.matmul((chunk, vb), (k_s if backward else w_s, st_s))
                out = ops.load(seq_sm.at[slot], WGMMA) + (first if backward else -first)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # and the last step's copy of out_sm
                out_sm[...] = out
                op_sm[...] = (-out if backward else out).astype(cdt)  # (backward: - w^T D below)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(st_s, states_out.at[row, i, :, vblock], commit_group=False)
                plgpu.copy_smem_to_gmem(out_sm, seq_out.at[row, tokens(i), vblock], commit_group=False)
                plgpu.commit_smem_to_gmem_group()
                decayed = state * d_sm[slot, 0]
                if backward:  # G_c = S_bar + d G + w^T (-D)
                    init = ops.load(per_chunk_sm.at[slot], WGMMA).astype(F32) + decayed
                    return ops.matmul((dk, vb), (("T", w_s), op_sm), init=init)
                return ops.matmul((dk, vb), (("T", k_s), op_sm), init=decayed)  # S' = d S + k^T delta

            state = chunk_loop(step, state, sources=sources, ready=ready, stages=stages, n_chunks=n_chunks,
                               reverse=backward)
            plgpu.wait_smem_to_gmem(0)
            return state

        _carry_state(ops, state_ref.at[row, :, vblock], final_out.at[row, :, vblock], loop,
                     [*slot_buffers(stages), *fixed, plgpu.Barrier(num_arrivals=len(slot_buffers(1)),
                                                                  num_barriers=stages)])

    sds = jax.ShapeDtypeStruct
    out_type = (sds((rows, n_chunks, dk, dv), cdt), sds((rows, tp, dv), F32), sds((rows, dk, dv), F32))
    return _launch(kernel, out_type, rows, dv // vb, call)(w, k, decay, seq, *([per_chunk] if backward else []),
                                                            state)


def _carry_state(ops: Ops, state_src, final_dst, loop, buffers) -> None:
    """The kernel body around a chunk loop: the state block from `state_src` into registers, `loop(state,
    *buffers) -> state` with its shared memory, the final state to `final_dst` (each in its own scope, so the
    loop's buffers can take the space)."""
    shape = state_src.shape
    state = pl.run_scoped(lambda sm, barrier: load_state(ops, state_src, sm, barrier), smem(shape, F32),
                          plgpu.Barrier())
    state = pl.run_scoped(functools.partial(loop, state), *buffers)
    pl.run_scoped(lambda sm: store_state(state, sm, final_dst), smem(shape, F32))


def _launch(kernel, out_type, rows: int, vblocks: int, call: _Call):
    return plgpu.kernel(kernel, out_type=out_type, grid=(rows, vblocks), grid_names=("rows", "vblocks"),
                        compiler_params=plgpu.CompilerParams(approx_math=True), interpret=call.interpret)


def _output_slots(chunk, dk, vb, cdt, stages: int) -> list:
    """The output pass's inputs per TMA slot: w_c, k_c, the decay, attn_c, u_c."""
    sw = _swizzle(vb, cdt)
    return [smem((stages, chunk, dk), cdt, sw), smem((stages, chunk, dk), cdt, sw), vectors((stages, chunk)),
            smem((stages, chunk, chunk), cdt, sw), smem((stages, chunk, vb), F32)]


def _output_fixed(chunk, dk, vb, cdt) -> list:
    """q_c (one buffer, fetched for the next chunk once this one's output product has read it), the state and
    delta_c as operands, o_c on its way out."""
    sw = _swizzle(vb, cdt)
    return [smem((chunk, dk), cdt, sw), smem((dk, vb), cdt, sw), smem((chunk, vb), cdt, sw),
            smem((chunk, vb), cdt)]


def _outputs(call: _Call, w, k, decay, u, q, attn, state):
    """The forward with the chunks' outputs instead of their states (nothing kept for a backward):

        delta_c = u_c - w_c S_c,    o_c = q_c S_c + attn_c delta_c,    S_{c+1} = d_c S_c + k_c^T delta_c

    w, k, q [X, n*C, dk] and attn [X, n*C, C] in the operand dtype, decay [X, n*C], u [X, n*C, dv] fp32, state
    [X, dk, dv] fp32. Returns (o [X, n*C, dv] in the operand dtype, final state). Three wgmma chains per chunk;
    q_c has one buffer (two slots of it do not fit next to w and k at d_k 256)."""
    rows, tp, dk = w.shape
    dv, chunk, vb, cdt = state.shape[-1], call.chunk, call.vb, w.dtype
    n_chunks = tp // chunk
    ops = Ops(bool(call.interpret), chunk)
    slot_buffers = functools.partial(_output_slots, chunk, dk, vb, cdt)
    fixed = _output_fixed(chunk, dk, vb, cdt)
    stages = fit(slot_buffers, fixed, call.stages, n_chunks, "GDN output", call.interpret)

    def kernel(w_ref, k_ref, d_ref, attn_ref, u_ref, q_ref, state_ref, o_out, final_out):
        row, vblock = lax.axis_index("rows"), pl.ds(lax.axis_index("vblocks") * vb, vb)

        def chunk_rows(i):
            return row, pl.ds(i * chunk, chunk)

        def loop(state, w_sm, k_sm, d_sm, attn_sm, u_sm, q_sm, s_op, d_op, o_sm, ready, q_ready):
            sources = [(w_ref, w_sm, chunk_rows), (k_ref, k_sm, chunk_rows), (d_ref, d_sm, chunk_rows),
                       (attn_ref, attn_sm, chunk_rows), (u_ref, u_sm, lambda i: (*chunk_rows(i), vblock))]
            plgpu.copy_gmem_to_smem(q_ref.at[chunk_rows(0)], q_sm, q_ready)

            def step(i, slot, state):
                s_op[...] = state.astype(cdt)
                plgpu.commit_smem()
                delta = ops.load(u_sm.at[slot], WGMMA) - ops.matmul((chunk, vb), (w_sm.at[slot], s_op))
                d_op[...] = delta.astype(cdt)
                plgpu.commit_smem()
                plgpu.barrier_wait(q_ready)
                o = ops.matmul((chunk, vb), (q_sm, s_op), (attn_sm.at[slot], d_op))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's o has left o_sm
                o_sm[...] = o.astype(cdt)
                plgpu.commit_smem()  # (and every warp is past the product that read q_sm)
                plgpu.copy_smem_to_gmem(o_sm, o_out.at[(*chunk_rows(i), vblock)])

                @pl.when(i + 1 < n_chunks)
                def _():
                    plgpu.copy_gmem_to_smem(q_ref.at[chunk_rows(i + 1)], q_sm, q_ready)

                return ops.matmul((dk, vb), (("T", k_sm.at[slot]), d_op), init=state * d_sm[slot, 0])

            state = chunk_loop(step, state, sources=sources, ready=ready, stages=stages, n_chunks=n_chunks,
                               reverse=False)
            plgpu.wait_smem_to_gmem(0)
            return state

        _carry_state(ops, state_ref.at[row, :, vblock], final_out.at[row, :, vblock], loop,
                     [*slot_buffers(stages), *fixed, plgpu.Barrier(num_arrivals=len(slot_buffers(1)),
                                                                  num_barriers=stages), plgpu.Barrier()])

    out_type = (jax.ShapeDtypeStruct((rows, tp, dv), cdt), jax.ShapeDtypeStruct((rows, dk, dv), F32))
    return _launch(kernel, out_type, rows, dv // vb, call)(w, k, decay, attn, u, q, state)


def default_vb(dv: int) -> int:
    """32 columns: a [256, 32] fp32 state block is 64 registers a thread."""
    return min(32, dv)


def _decay_rows(decay, c: int):
    """[b, h, n] -> [b*h, n*C]: each chunk's decay repeated over its tokens."""
    return jnp.repeat(rows(decay).astype(F32), c, axis=-1)


def _settings(dtype, interpret, vb: int | None, stages: int, c: int, dk: int, dv: int) -> _Call:
    block = vb or default_vb(dv)
    if reason := unsupported(dk, dv, c, block, device_dtype(dtype, interpret)):
        raise ValueError(f"Mosaic GPU GDN kernels: {reason}")
    return _Call(c, block, stages, interpret)


def scans(dtype, interpret=None, vb: int | None = None, stages: int = 2):
    """(forward, backward) of `gated_delta.chunk_state_recurrence` on these kernels, matmul operands in `dtype`
    (`gated_delta.make_recurrence` joins them; the contract of `pallas_gdn.scans`):

    forward(u, w, k, decay, state) -> (states, deltas, final state);
    backward(w, k, decay, states_bar, deltas_bar, final_bar) -> (G_0, G_{c+1} per chunk, D per chunk)."""

    def forward(u, w, k, decay, state):
        b, h, n, c, dv = u.shape
        call = _settings(dtype, interpret, vb, stages, c, w.shape[-1], dv)
        states, deltas, final = _scan(call, seq_rows(w).astype(dtype), seq_rows(k).astype(dtype),
                                      _decay_rows(decay, c), seq_rows(u).astype(F32), None, rows(state).astype(F32),
                                      backward=False)
        return states.reshape(b, h, *states.shape[1:]), deltas.reshape(u.shape), final.reshape(state.shape)

    def backward(w, k, decay, states_bar, deltas_bar, final_bar):
        b, h, n, c, dv = deltas_bar.shape
        call = _settings(dtype, interpret, vb, stages, c, w.shape[-1], dv)
        g_next, d_deltas, g0 = _scan(call, seq_rows(w).astype(dtype), seq_rows(k).astype(dtype),
                                     _decay_rows(decay, c), seq_rows(deltas_bar).astype(F32),
                                     rows(states_bar).astype(dtype), rows(final_bar).astype(F32), backward=True)
        return g0.reshape(final_bar.shape), g_next.reshape(states_bar.shape), d_deltas.reshape(deltas_bar.shape)

    return forward, backward


def outputs(dtype, interpret=None, vb: int | None = None, stages: int = 2):
    """The chunked rule's outputs and final state in one pass, for a forward that keeps nothing for a backward
    (`_outputs`): f(u, w, k, decay, state, q, attn) -> (o [b, h, n, C, dv] in `dtype`, final state), the inputs
    those of `scans`' forward plus the decayed queries q [b, h, n, C, dk] and the chunk weights attn
    [b, h, n, C, C]."""

    def run(u, w, k, decay, state, q, attn):
        b, h, n, c, dv = u.shape
        call = _settings(dtype, interpret, vb, stages, c, w.shape[-1], dv)
        o, final = _outputs(call, *(seq_rows(x).astype(dtype) for x in (w, k)), _decay_rows(decay, c),
                            seq_rows(u).astype(F32), *(seq_rows(x).astype(dtype) for x in (q, attn)),
                            rows(state).astype(F32))
        return o.reshape(u.shape), final.reshape(state.shape)

    return run
