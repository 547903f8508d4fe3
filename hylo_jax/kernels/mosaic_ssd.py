"""Mosaic GPU (Hopper: wgmma, TMA) kernels for the chunked Mamba2 SSD scan, forward and backward.

One CTA per (sequence, head) walks the chunks with the fp32 state, held transposed as S^T
[P, N] (the layout of the initial and final states), in registers. Per chunk of C tokens (G the chunk-local
cumulative log-decay, masked at segment resets as in `pallas_common.decays`; matmul operands in the inputs'
bf16/fp16, fp32 accumulation):

    M    = (C B^T) o E o dt_j                     E_ij = e^{G_i - G_j} for j <= i in the same segment
    y    = M x + d_in o (C S)                     d_in_i = e^{G_i} while still in the carried-in segment
    S^T' = d_chunk S^T + (d_out o dt o x)^T B     d_out_j = e^{G_last - G_j} in the last segment

The operands the kernels form themselves by scaling, M, the scaled x and the backward's [C, C] M'^T, dCB and
dCB^T, go to the wgmmas as high + low parts in the operand dtype (`high_low`, two wgmmas each), and d_in
scales the forward's accumulator rows rather than C: one bf16 rounding of such an operand adds about as much
error as the rounding of the output itself (with one rounding each, y was ~2x further from fp32 than the
chunked path's in bf16, and so the gradients of a loss non-linear in y 2-4x). S^T stays one operand in the
operand dtype (the output side's and the backward's saved copy), as do the backward's dS'^T, d_in o dy,
d_in o C and d_out o v: each costs a few percent of the gradients' error.
The forward's products are 6 wgmmas (M from registers, S^T and the scaled x stored in the operand dtype and
read transposed); the backward walks the chunks in reverse carrying dS^T, from the entering states the
forward saved, in 14. Both run on two warpgroups of one CTA sharing the TMA slots: one carries the state (or
dS^T) and hands each chunk's over in shared memory, the other computes the outputs (`_forward`, `_backward`);
the span state passes run on one. x, B, C, dy are read in their own
[b, t, heads or groups, dim] layout (TMA boxes of C rows, no transposing copies), dt and G as [b, h, t] vectors;
TMA brings them ``stages`` chunks ahead into tiled, 128-byte-swizzled shared memory (one barrier per slot),
outputs leave by TMA from shared memory.
Batches of fewer sequence-heads than SMs are cut into spans run side by side (`ssd_mosaic`).

On CPU the kernels run in the GPU interpreter and are lowered for CUDA (`mosaic_common`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Bool, Float

from .mosaic_common import (
    BY_COL,
    BY_ROW,
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
    high_low,
    nbytes,
    smem,
    store,
    two_warpgroup_loop,
    vectors,
)
from .pallas_common import grid_cores


def unsupported(p: int, n: int, chunk: int, dtype) -> str | None:
    """Why the kernels cannot take this shape (None if they can): wgmma tiles and 128-byte swizzled rows."""
    if reason := dtype_reason(dtype):
        return reason
    for name, d in (("head_dim", p), ("d_state", n), ("chunk_size", chunk)):
        if d % 64:
            return f"{name}={d} is not a multiple of 64 (wgmma tiles, 128-byte swizzle)"
    if n * p > 128 * 128:
        return f"state {n} x {p} too large for one warpgroup's registers"
    if chunk > 128:
        return f"chunk_size={chunk} > 128 ([C, C] fp32 blocks in registers)"
    if (need := _smem_need(chunk, p, n, dtype)) > SMEM_BYTES:
        return f"chunk {chunk}, head_dim {p}, d_state {n}: the backward needs {need} B of shared memory > {SMEM_BYTES}"
    return None


@dataclasses.dataclass(frozen=True)
class _Where:
    """Where this CTA's (sequence, head) reads and writes chunk i in each kind of array."""

    batch: jax.Array
    head: jax.Array
    group: jax.Array
    chunk: int

    @classmethod
    def here(cls, per_group: int, chunk: int) -> _Where:
        head = lax.axis_index("heads")
        return cls(lax.axis_index("batch"), head, head // per_group, chunk)

    def tokens(self, i):
        return pl.ds(i * self.chunk, self.chunk)

    def by_head(self, i):  # [Bt, T, H, D]: x, y, dy, dx, per-head dB / dC
        return self.batch, self.tokens(i), self.head

    def by_group(self, i):  # [Bt, T, G, N]: B, C
        return self.batch, self.tokens(i), self.group

    def gates(self, i):  # [Bt, H, T]: dt, G and their cotangents
        return self.batch, self.head, self.tokens(i)

    def segments(self, i):  # [Bt, T]
        return self.batch, self.tokens(i)

    def per_chunk(self, i):  # [Bt, H, T/C, ...]: saved states, chunk-end terms
        return self.batch, self.head, i

    @property
    def state(self):  # [Bt, H, P, N]: initial and final states, their cotangents
        return self.batch, self.head


# ---------------------------------------------------------------------------------------------- buffers
def _forward_slots(chunk, p, n, cdt, mode: str, stages: int) -> list:
    """The forward's shared memory per TMA slot: x, B, dt, G, segment index; with outputs C, y and the state
    entering the chunk in the operand dtype (the output side's operand, and what "train" saves)."""
    buffers = [smem((stages, chunk, p), cdt), smem((stages, chunk, n), cdt), *[vectors((stages, chunk))] * 3]
    if mode != "state":
        buffers += [smem((stages, chunk, n), cdt), smem((stages, chunk, p), cdt), smem((stages, p, n), cdt)]
    return buffers


def _forward_fixed(chunk, p, n, cdt, mode: str) -> list:
    """The scaled x (the state update's operand) as high and low parts (`high_low`)."""
    return [smem((chunk, p), cdt)] * 2


def _backward_slots(chunk, p, n, cdt, mode: str, stages: int) -> list:
    """The backward's inputs per TMA slot: C, dy, dt, G, segment index; for gradients x, B and the entering
    state S^T (the forward's, in the operand dtype)."""
    buffers = [smem((stages, chunk, n), cdt), smem((stages, chunk, p), cdt), *[vectors((stages, chunk))] * 3]
    if mode == "grads":
        buffers += [smem((stages, chunk, p), cdt), smem((stages, chunk, n), cdt), smem((stages, p, n), cdt)]
    return buffers


def _backward_fixed(chunk, p, n, cdt, mode: str) -> list:
    """d_in o C; for gradients dS'^T as an operand in two buffers (the direct side writes chunk i's while the
    transposed side reads chunk i+1's), then each side's outputs, one slot each (a chunk's stores have the next
    chunk's compute to leave): dx, dB (operand dtype), d(dt), out, its part of dG; dC, its part of dG, chunk-end."""
    buffers = [smem((chunk, n), cdt)]
    if mode == "grads":
        buffers += [smem((2, p, n), cdt), smem((chunk, p), cdt), smem((chunk, n), cdt), *[vectors((chunk,))] * 3,
                    smem((chunk, n), cdt), vectors((chunk,)), vectors((p,))]
    return buffers


def _smem_need(chunk: int, p: int, n: int, dtype) -> int:
    """Shared memory of the larger chunk loop (forward with saved states, or the backward) at one slot (the
    fp32 state's staging buffer has a scope of its own, `carry_state`)."""
    return max(nbytes(_forward_slots(chunk, p, n, dtype, "train", 1) + _forward_fixed(chunk, p, n, dtype, "train")),
               nbytes(_backward_slots(chunk, p, n, dtype, "grads", 1) + _backward_fixed(chunk, p, n, dtype, "grads")))


# ---------------------------------------------------------------------------------------------- forward
def _forward(x, b, c, dt, g, seg, h0, *, chunk: int, stages: int, mode: str, interpret):
    """The forward kernel over the inputs' own layouts: x [Bt, T, H, P], b/c [Bt, T, G, N], dt/g [Bt, H, T]
    fp32, seg [Bt, T] fp32, h0 [Bt, H, P, N] fp32 (S^T); T a multiple of `chunk`. `mode`:
      "state"  the final state only (c unused): a span's state pass; one warpgroup;
      "y"      (y [Bt, T, H, P] in x's dtype, final state);
      "train"  (y, final state, the state entering every chunk [Bt, H, T/C, P, N] in x's dtype: the
               backward's wgmma operand, half the bytes of fp32).
    With outputs two warpgroups share the TMA slots: the state side carries S^T, issues the copies and hands
    each chunk's entering state (operand dtype) to the output side through its slot; the output side computes
    M and y."""
    batch_size, tp, heads, p = x.shape
    groups, n = b.shape[2:]
    n_chunks, cdt = tp // chunk, x.dtype
    ops, per_group = Ops(bool(interpret), chunk), heads // groups
    with_y, save = mode != "state", mode == "train"

    slot_buffers = functools.partial(_forward_slots, chunk, p, n, cdt, mode)
    fixed = _forward_fixed(chunk, p, n, cdt, mode)
    stages = fit(slot_buffers, fixed, stages, n_chunks, "SSD forward", interpret)

    def kernel(x_ref, b_ref, c_ref, dt_ref, g_ref, seg_ref, h0_ref, *outs):
        y_ref, ht_ref, states_ref = (outs[0], outs[1], outs[2] if save else None) if with_y else (None, outs[0], None)
        at = _Where.here(per_group, chunk)

        def loop(state, x_sm, b_sm, dt_sm, g_sm, seg_sm, *rest):
            sources = [(x_ref, x_sm, at.by_head), (b_ref, b_sm, at.by_group), (dt_ref, dt_sm, at.gates),
                       (g_ref, g_sm, at.gates), (seg_ref, seg_sm, at.segments)]
            if with_y:
                c_sm, y_sm, s_sm, xs_sm, xl_sm, ready, consumed, s_ready = rest
                sources.append((c_ref, c_sm, at.by_group))
            else:
                xs_sm, xl_sm, ready = rest

            def update(ch, slot, state):
                """S^T' = d_chunk S^T + (d_out o dt o x)^T B, the scaled x in two parts (`high_low`)."""
                dt_i = ops.load(dt_sm.at[slot], BY_ROW)
                xs_sm[...], xl_sm[...] = high_low(
                    ops.load(x_sm.at[slot], WGMMA).astype(F32) * ch.rows_of(ch.d_out * dt_i, p), cdt)
                plgpu.commit_smem()
                b_s = b_sm.at[slot]
                return ops.matmul((p, n), (("T", xs_sm), b_s), (("T", xl_sm), b_s), init=state * ch.d_chunk)

            if not with_y:
                def state_step(i, slot, state):
                    return update(ChunkGates.load(ops, g_sm, seg_sm, slot), slot, state)

                return chunk_loop(state_step, state, sources=sources, ready=ready, stages=stages, n_chunks=n_chunks,
                                  reverse=False)

            def state_side(i, slot, state):
                ch = ChunkGates.load(ops, g_sm, seg_sm, slot)
                if save:  # the slot's last saved state has left
                    plgpu.wait_smem_to_gmem(stages - 1, wait_read_only=True)
                s_sm.at[slot][...] = state.astype(cdt)
                plgpu.commit_smem()
                plgpu.barrier_arrive(s_ready.at[slot])
                if save:
                    plgpu.copy_smem_to_gmem(s_sm.at[slot], states_ref.at[at.per_chunk(i)])
                state = update(ch, slot, state)
                plgpu.barrier_arrive(consumed.at[slot])
                return state

            def output_side(i, slot, carry):
                """y = M x + d_in o (C S),  M = (C B^T) o E o dt_j in two parts (`high_low`); d_in scales the
                accumulator's rows (C itself is the operand: no rounding of d_in o C)."""
                c_s, x_s = c_sm.at[slot], x_sm.at[slot]
                ch = ChunkGates.load(ops, g_sm, seg_sm, slot)
                g_j, s_j = ch.columns(g_sm, seg_sm, slot)
                dt_j = ops.load(dt_sm.at[slot], BY_COL)
                m = ops.matmul((chunk, chunk), (c_s, ("T", b_sm.at[slot]))) * ch.decay(g_j, s_j) * ops.square(dt_j, 1)
                m_high, m_low = high_low(m, cdt)
                plgpu.barrier_wait(s_ready.at[slot])
                y_in = ops.matmul((chunk, p), (c_s, ("T", s_sm.at[slot]))) * ch.rows_of(ch.d_in, p)
                y = ops.matmul((chunk, p), (m_high, x_s), (m_low, x_s), init=y_in)
                plgpu.barrier_arrive(consumed.at[slot])
                store(stages, (y, y_sm.at[slot], y_ref.at[at.by_head(i)]))
                return carry

            return two_warpgroup_loop(ops, state_side, output_side, state, consumed=consumed, sources=sources,
                                      ready=ready, stages=stages, n_chunks=n_chunks, reverse=False)

        barriers = [plgpu.Barrier(num_arrivals=len(slot_buffers(1)) - 2 * with_y, num_barriers=stages)]
        if with_y:  # slot consumed (both sides), entering state ready
            barriers += [plgpu.Barrier(num_arrivals=2, num_barriers=stages), plgpu.Barrier(num_barriers=stages)]
        carry_state(ops, h0_ref.at[at.state], ht_ref.at[at.state], loop, [*slot_buffers(stages), *fixed, *barriers],
                    owner=lax.axis_index("wg") == 0 if with_y else None)

    final = jax.ShapeDtypeStruct((batch_size, heads, p, n), F32)
    out_type = [jax.ShapeDtypeStruct(x.shape, cdt), final] if with_y else [final]
    if save:
        out_type.append(jax.ShapeDtypeStruct((batch_size, heads, n_chunks, p, n), cdt))
    threads = dict(num_threads=2, thread_name="wg") if with_y else {}
    call = gpu_kernel(kernel, f"ssd_forward_{mode}", out_type=tuple(out_type), grid=(batch_size, heads),
                      grid_names=("batch", "heads"), interpret=interpret, **threads)
    outs = call(x, b, c, dt, g, seg, h0)
    return outs if with_y else outs[0]


# ---------------------------------------------------------------------------------------------- backward
def _backward(x, b, c, dt, g, seg, states, dy, dht, *, chunk: int, stages: int, mode: str, interpret):
    """The backward kernel, chunks in reverse, carrying dS^T [P, N] from `dht` [Bt, H, P, N] (the final
    state's cotangent). Inputs as `_forward`'s plus the entering states of mode "train" and dy [Bt, T, H, P]
    in x's dtype. `mode`:
      "state"  dS^T at the first token only (x, b, states unused): a span's state pass; one warpgroup;
      "grads"  (dx and dB, dC per head [Bt, T, H, N] in x's dtype (the wrapper sums dB, dC over a group's heads
               in fp32), then fp32: d(dt) [Bt, H, T], dG without the chunk-end terms in two parts [Bt, H, T]
               (one per warpgroup, summed by the wrapper), the d_out terms dd_out * d_out [Bt, H, T],
               dd_chunk * d_chunk by state row [Bt, H, T/C, P], dS^T at the first token).

    Per chunk, with v = dt o x, M' = (C B^T) o E (y = M' v + (d_in o C) S) and dS' the carried cotangent:
      dv = M'^T dy + d_out o (B dS')          dS^T = dy^T (d_in o C) + d_chunk dS'^T
      dP = dy v^T, dCB = dP o E               dC = dCB B + (d_in o dy) S^T,  dB = dCB^T C + (d_out o v) dS'^T
      dG_k = sum_j z_kj - sum_i z_ik + dd_in_k d_in_k - dd_out_k d_out_k (+ chunk-end terms), z = dCB o C B^T
    For gradients two warpgroups share the TMA slots, each with its own registers (a thread has 255; one
    warpgroup spilled at N = 128): the direct side carries dS (and hands each chunk's dS' over in shared
    memory), issues the copies and computes dC, z's row sums, dd_in and the chunk-end terms; the transposed side
    computes dv, dx, d(dt), dB, z's column sums and dd_out.
    """
    batch_size, tp, heads, p = x.shape
    groups, n = b.shape[2:]
    n_chunks, cdt = tp // chunk, x.dtype
    ops, per_group = Ops(bool(interpret), chunk), heads // groups
    grads = mode == "grads"

    slot_buffers = functools.partial(_backward_slots, chunk, p, n, cdt, mode)
    fixed = _backward_fixed(chunk, p, n, cdt, mode)
    stages = fit(slot_buffers, fixed, stages, n_chunks, "SSD backward", interpret)
    n_in = len(slot_buffers(1))

    def kernel(x_ref, b_ref, c_ref, dt_ref, g_ref, seg_ref, states_ref, dy_ref, dht_ref, *outs):
        at = _Where.here(per_group, chunk)

        def carry_back(ch, slot, dst, c_sm, dy_sm, cin_sm):
            """dS^T entering the chunk from dS'^T leaving it: dy^T (d_in o C) + d_chunk dS'^T."""
            cin_sm[...] = (ops.load(c_sm.at[slot], WGMMA).astype(F32) * ch.rows_of(ch.d_in, n)).astype(cdt)
            plgpu.commit_smem()
            return ops.matmul((p, n), (("T", dy_sm.at[slot]), cin_sm), init=ch.d_chunk * dst)

        def send(i, *outputs):
            """(smem buffer, gmem ref, index of chunk i) as one TMA group."""
            plgpu.commit_smem()
            for src, out_ref, index in outputs:
                plgpu.copy_smem_to_gmem(src, out_ref.at[index(i)], commit_group=False)
            plgpu.commit_smem_to_gmem_group()

        def loop(dst, c_sm, dy_sm, dt_sm, g_sm, seg_sm, *rest):
            sources = [(c_ref, c_sm, at.by_group), (dy_ref, dy_sm, at.by_head), (dt_ref, dt_sm, at.gates),
                       (g_ref, g_sm, at.gates), (seg_ref, seg_sm, at.segments)]
            if not grads:
                cin_sm, ready = rest

                def state_step(i, slot, dst):
                    return carry_back(ChunkGates.load(ops, g_sm, seg_sm, slot), slot, dst, c_sm, dy_sm, cin_sm)

                return chunk_loop(state_step, dst, sources=sources, ready=ready, stages=stages, n_chunks=n_chunks,
                                  reverse=True)

            (x_sm, b_sm, st_sm, cin_sm, ds_sm, dx_sm, db_sm, ddt_sm, out_sm, dga_sm, dc_sm, dgb_sm, dch_sm,
             ready, consumed, ds_ready, ds_free) = rest
            sources += [(x_ref, x_sm, at.by_head), (b_ref, b_sm, at.by_group), (states_ref, st_sm, at.per_chunk)]
            dx_ref, db_ref, dc_ref, ddt_ref, dga_ref, dgb_ref, out_ref, dch_ref, _ = outs

            def handover(i):  # the dS' buffer of chunk i and its position (chunks run last to first)
                k = n_chunks - 1 - i
                return lax.rem(k, 2), k

            def direct_side(i, slot, dst):
                """dS' to the transposed side, then dC = dCB B + (d_in o dy) S^T, dCB = (dy v^T) o E (in two parts,
                `high_low`), z's row sums, dd_in, the chunk-end terms, and dS for the next chunk."""
                buf, k = handover(i)
                x_s, b_s, c_s, dy_s, s_s = x_sm.at[slot], b_sm.at[slot], c_sm.at[slot], dy_sm.at[slot], st_sm.at[slot]

                @pl.when(k >= 2)
                def _():  # the transposed side is done with chunk i + 2's dS'
                    plgpu.barrier_wait(ds_free.at[buf])
                ds_sm.at[buf][...] = dst.astype(cdt)
                plgpu.commit_smem()
                plgpu.barrier_arrive(ds_ready.at[buf])
                ch = ChunkGates.load(ops, g_sm, seg_sm, slot)
                chunk_end = jnp.sum(ops.load(s_s, WGMMA).astype(F32) * dst * ch.d_chunk, axis=1)
                g_j, s_j = ch.columns(g_sm, seg_sm, slot)
                dt_j = ops.load(dt_sm.at[slot], BY_COL)
                d_p, cb = ops.matmuls(([(dy_s, ("T", x_s))], ops.zeros((chunk, chunk))),
                                      ([(c_s, ("T", b_s))], ops.zeros((chunk, chunk))))
                d_cb = d_p * ops.square(dt_j, 1) * ch.decay(g_j, s_j)
                z_rows = jnp.sum(d_cb * cb, axis=1)
                d_cb_high, d_cb_low = high_low(d_cb, cdt)
                dy_f32 = ops.load(dy_s, WGMMA).astype(F32)
                dd_in = jnp.sum(dy_f32 * ops.matmul((chunk, p), (c_s, ("T", s_s))), axis=1)  # sum_p dy_kp (C S)_kp
                dy_in = (dy_f32 * ch.rows_of(ch.d_in, p)).astype(cdt)
                dc = ops.matmul((chunk, n), (d_cb_high, b_s), (d_cb_low, b_s), (dy_in, s_s))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's outputs have left
                dc_sm[...] = dc.astype(cdt)
                dgb_sm[...] = z_rows + dd_in * ch.d_in
                dch_sm[...] = chunk_end
                send(i, (dc_sm, dc_ref, at.by_head), (dgb_sm, dgb_ref, at.gates), (dch_sm, dch_ref, at.per_chunk))
                dst = carry_back(ch, slot, dst, c_sm, dy_sm, cin_sm)
                plgpu.barrier_arrive(consumed.at[slot])
                return dst

            def transposed_side(i, slot, carry):
                """dv = M'^T dy + U, U = d_out o (B dS'), dx = dt o dv, dB = dCB^T C + (d_out o v) dS'^T, z's column
                sums and dd_out; M'^T and dCB^T in two parts (`high_low`)."""
                buf, _ = handover(i)
                x_s, b_s, c_s, dy_s, ds_s = x_sm.at[slot], b_sm.at[slot], c_sm.at[slot], dy_sm.at[slot], ds_sm.at[buf]
                ch = ChunkGates.load(ops, g_sm, seg_sm, slot)
                g_j, s_j = ch.columns(g_sm, seg_sm, slot)
                dt_i = ops.load(dt_sm.at[slot], BY_ROW)
                e_t = ch.decay(g_j, s_j, transposed=True)
                d_p_t, cb_t = ops.matmuls(([(x_s, ("T", dy_s))], ops.zeros((chunk, chunk))),
                                          ([(b_s, ("T", c_s))], ops.zeros((chunk, chunk))))
                d_cb_t = d_p_t * ops.square(dt_i, 0) * e_t
                z_cols = jnp.sum(d_cb_t * cb_t, axis=1)
                d_cb_t_high, d_cb_t_low = high_low(d_cb_t, cdt)
                m_t_high, m_t_low = high_low(cb_t * e_t, cdt)
                plgpu.barrier_wait(ds_ready.at[buf])
                u = ops.matmul((chunk, p), (b_s, ("T", ds_s))) * ch.rows_of(ch.d_out, p)
                v = ops.load(x_s, WGMMA).astype(F32) * ch.rows_of(dt_i, p)
                out = jnp.sum(v * u, axis=1)  # dd_out o d_out: dd_out_k = sum_p v_kp (B dS')_kp
                dv = ops.matmul((chunk, p), (m_t_high, dy_s), (m_t_low, dy_s), init=u)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's outputs have left
                dx_sm[...] = (dv * ch.rows_of(dt_i, p)).astype(cdt)
                ddt_sm[...] = jnp.sum(dv * ops.load(x_s, WGMMA).astype(F32), axis=1)
                v_out = (v * ch.rows_of(ch.d_out, p)).astype(cdt)
                db_sm[...] = ops.matmul((chunk, n), (d_cb_t_high, c_s), (d_cb_t_low, c_s), (v_out, ds_s)).astype(cdt)
                plgpu.barrier_arrive(ds_free.at[buf])
                out_sm[...] = out
                dga_sm[...] = -z_cols - out
                plgpu.barrier_arrive(consumed.at[slot])
                send(i, (dx_sm, dx_ref, at.by_head), (db_sm, db_ref, at.by_head), (ddt_sm, ddt_ref, at.gates),
                     (out_sm, out_ref, at.gates), (dga_sm, dga_ref, at.gates))
                return carry

            return two_warpgroup_loop(ops, direct_side, transposed_side, dst, consumed=consumed,
                                      handovers=[(ds_free, 2)], sources=sources, ready=ready, stages=stages,
                                      n_chunks=n_chunks, reverse=True)

        barriers = [plgpu.Barrier(num_arrivals=n_in, num_barriers=stages)]
        if grads:  # slot consumed (both sides), dS' ready, dS' read
            barriers += [plgpu.Barrier(num_arrivals=2, num_barriers=stages), plgpu.Barrier(num_barriers=2),
                         plgpu.Barrier(num_barriers=2)]
        carry_state(ops, dht_ref.at[at.state], outs[-1].at[at.state], loop,
                    [*slot_buffers(stages), *fixed, *barriers], owner=lax.axis_index("wg") == 0 if grads else None)

    sds = jax.ShapeDtypeStruct
    d0 = sds((batch_size, heads, p, n), F32)
    vec = sds((batch_size, heads, tp), F32)
    per_head = sds((batch_size, tp, heads, n), cdt)
    out_type = ((sds(x.shape, cdt), per_head, per_head, vec, vec, vec, vec, sds((batch_size, heads, n_chunks, p), F32),
                 d0) if grads else (d0,))
    threads = dict(num_threads=2, thread_name="wg") if grads else {}
    call = gpu_kernel(kernel, f"ssd_backward_{mode}", out_type=out_type, grid=(batch_size, heads),
                      grid_names=("batch", "heads"), interpret=interpret, **threads)
    outs = call(x, b, c, dt, g, seg, states, dy, dht)
    return outs if grads else outs[0]


# ---------------------------------------------------------------------------------------------- the op
def spans_for(batch_heads: int, n_chunks: int, cores: int, min_chunks: int = 8) -> int:
    """Sequence spans per row: as many as keep batch x heads x spans CTAs within one wave over the `cores` SMs
    (one CTA per SM: its shared memory), each span >= `min_chunks` chunks (a span's state pass and the carry
    between spans cost ~1/3 of a forward)."""
    return max(1, min(cores // max(batch_heads, 1), n_chunks // min_chunks))


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The static arguments of one call (`t`: its sequence length before padding)."""

    t: int
    chunk: int
    spans: int
    stages: int
    interpret: object

    def kernel(self, fn, *args, mode: str):
        return fn(*args, chunk=self.chunk, stages=self.stages, mode=mode, interpret=self.interpret)


def _split(s: _Settings, x, dt, A, B, C, reset):
    """The inputs cut into spans: x, B, C [b*spans, span, ...]; dt and G [b*spans, h, span] fp32; the segment
    index [b*spans, span] fp32; and each span's decay end to end [b, spans, h] (0 across a reset)."""
    b, t, h, _ = x.shape
    span = -(-t // (s.chunk * s.spans)) * s.chunk

    def cut(z):  # zero-padded: dt = 0 makes padded steps identities
        z = jnp.pad(z, [(0, 0), (0, span * s.spans - t)] + [(0, 0)] * (z.ndim - 2))
        return z.reshape(b * s.spans, span, *z.shape[2:])

    x, B, C, reset = (cut(z) for z in (x, B, C, reset))
    dt = jnp.swapaxes(cut(dt.astype(F32)), 1, 2)
    log_decay = dt * A.astype(F32)[:, None]
    g_cum = jnp.cumsum(log_decay.reshape(b * s.spans, h, span // s.chunk, s.chunk), axis=-1)
    seg = jnp.cumsum(reset.reshape(-1, span // s.chunk, s.chunk).astype(jnp.int32), axis=-1)
    through = jnp.where(jnp.any(reset, axis=1)[:, None], 0.0, jnp.exp(jnp.sum(log_decay, axis=-1)))
    return (x, B, C, dt, g_cum.reshape(dt.shape), seg.reshape(reset.shape).astype(F32),
            through.reshape(b, s.spans, h))


def _across_spans(through, local, first, reverse: bool):
    """The state at each span's start (forward: state_s = through_{s-1} state_{s-1} + local_{s-1}, from
    `first`), or the cotangent at each span's end (reverse: d_s = through_{s+1} d_{s+1} + local_{s+1}, from
    `first` at the last span). through [b, spans, h], local [b, spans, h, P, N] -> [b * spans, h, P, N]. Unrolled:
    a few steps on small states, which XLA fuses (a loop cost a copy and a launch per step, ~10% of a 1 x 16K
    forward)."""
    through, local = jnp.moveaxis(through, 1, 0), jnp.moveaxis(local, 1, 0)

    def carry(state, span):
        decay, own = span
        state = decay[..., None, None] * state + own
        return state, state

    if reverse:
        _, ends = lax.scan(carry, first, (through[1:], local[1:]), reverse=True, unroll=True)
        states = jnp.concatenate([ends, first[None]], axis=0)
    else:
        _, starts = lax.scan(carry, first, (through[:-1], local[:-1]), unroll=True)
        states = jnp.concatenate([first[None], starts], axis=0)
    return jnp.moveaxis(states, 0, 1).reshape(-1, *states.shape[2:])


def _ssd_forward(s: _Settings, x, dt, A, B, C, reset, h0, mode: str):
    b, t, h, p = x.shape
    n = B.shape[-1]
    xs, bs, cs, dts, gs, segs, through = parts = _split(s, x, dt, A, B, C, reset)
    h0 = h0.astype(F32)
    starts = h0
    if s.spans > 1:
        local = s.kernel(_forward, xs, bs, cs, dts, gs, segs, jnp.zeros((b * s.spans, h, p, n), F32), mode="state")
        starts = _across_spans(through, local.reshape(b, s.spans, h, p, n), h0, reverse=False)
    y, final, *states = s.kernel(_forward, xs, bs, cs, dts, gs, segs, starts, mode=mode)
    y = y.reshape(b, -1, h, p)[:, :t]
    return (y, final.reshape(b, s.spans, h, p, n)[:, -1]), (parts, states, A)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd(s: _Settings, x, dt, A, B, C, reset, h0):
    return _ssd_forward(s, x, dt, A, B, C, reset, h0, mode="y")[0]


def _ssd_fwd(s: _Settings, x, dt, A, B, C, reset, h0):
    outs, (parts, states, A) = _ssd_forward(s, x, dt, A, B, C, reset, h0, mode="train")
    return outs, (parts, states[0], A)


def _ssd_bwd(s: _Settings, residuals, cotangents):
    (xs, bs, cs, dts, gs, segs, through), states, A = residuals
    dy, dfinal = cotangents
    b, t, (span, h, p), (g, n) = xs.shape[0] // s.spans, s.t, xs.shape[1:], bs.shape[2:]
    dy = jnp.pad(dy.astype(xs.dtype), [(0, 0), (0, span * s.spans - t), (0, 0), (0, 0)]).reshape(xs.shape)
    ends = jnp.zeros((b, s.spans, h, p, n), F32).at[:, -1].set(dfinal.astype(F32)).reshape(-1, h, p, n)
    if s.spans > 1:
        local = s.kernel(_backward, xs, bs, cs, dts, gs, segs, states, dy, jnp.zeros_like(ends), mode="state")
        ends = _across_spans(through, local.reshape(b, s.spans, h, p, n), dfinal.astype(F32), reverse=True)
    dx, db, dc, ddt, dg_a, dg_b, out, d_chunk, dstart = s.kernel(_backward, xs, bs, cs, dts, gs, segs, states, dy,
                                                                 ends, mode="grads")
    dg = dg_a + dg_b
    n_chunks = span // s.chunk
    chunk_end = (jnp.sum(out.reshape(b * s.spans, h, n_chunks, s.chunk), axis=-1) + jnp.sum(d_chunk, axis=-1))
    dg = dg.reshape(b * s.spans, h, n_chunks, s.chunk).at[..., -1].add(chunk_end)
    d_log_decay = jnp.flip(jnp.cumsum(jnp.flip(dg, -1), axis=-1), -1).reshape(dts.shape)  # G = cumsum(dt A)
    d_dt = ddt + d_log_decay * A.astype(F32)[:, None]
    d_a = jnp.sum(d_log_decay * dts, axis=(0, 2))

    def whole(z):  # [b * spans, span, ...] -> [b, t, ...]
        return z.reshape(b, s.spans * span, *z.shape[2:])[:, :t]

    def to_groups(z):  # per-head [.., h, N] -> per-group [.., g, N], summed in fp32 (XLA drops it when g == h)
        return whole(z).reshape(b, t, g, h // g, n).sum(3, dtype=F32).astype(bs.dtype)

    return (whole(dx), whole(jnp.swapaxes(d_dt, 1, 2)), d_a.astype(A.dtype), to_groups(db), to_groups(dc), None,
            dstart.reshape(b, s.spans, h, p, n)[:, 0])


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd_mosaic(
    x: Float[Array, "b t h p"],
    dt: Float[Array, "b t h"],
    A: Float[Array, " h"],
    B: Float[Array, "b t g n"],
    C: Float[Array, "b t g n"],
    reset: Bool[Array, "b t"],
    h0: Float[Array, "b h p n"],
    chunk_size: int,
    *,
    spans: int | None = None,
    stages: int = 3,
    interpret=None,
) -> tuple[Float[Array, "b t h p"], Float[Array, "b h p n"]]:
    """The SSD scan without the D term on Hopper, differentiable (`jax.custom_vjp` with its own backward
    kernel): x, B, C bf16/fp16, dt discretised fp32, A fp32, reset at the first token of every segment, h0
    fp32. Returns (y in x's dtype, final state fp32).

    ``spans``: each sequence is cut into this many spans run side by side (None: enough to fill the GPU's
    SMs, `spans_for`). Forward: a first kernel pass gives each span's final state from zero, a scan over the
    spans (XLA, tiny) the state entering each, H_s = e^{sum of dt A over span s-1} H_{s-1} + local_{s-1}
    (0 across a reset), and the second pass the outputs from it. The backward does the same in reverse for
    the state's cotangent, then every span's gradients from its true entering state (saved by the forward)
    and its true end cotangent, which are the sequential recurrence's. ``stages``: the most chunks in flight
    (TMA slots; fewer where shared memory is short). ``interpret``: an `InterpretGPUParams` (CPU)."""
    b, t, h, p = x.shape
    n = B.shape[-1]
    if reason := unsupported(p, n, chunk_size, device_dtype(x.dtype, interpret)):
        raise ValueError(f"Mosaic GPU SSD kernel: {reason}")
    if spans is None:
        spans = spans_for(b * h, -(-t // chunk_size), grid_cores(interpret))
    return _ssd(_Settings(t, chunk_size, spans, stages, interpret), x, dt.astype(F32), A.astype(F32), B, C, reset,
                h0.astype(F32))  # (fp32 gates and state: their cotangents come back fp32, cast by astype's VJP)

