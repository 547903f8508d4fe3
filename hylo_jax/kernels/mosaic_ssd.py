"""Mosaic GPU (Hopper: wgmma, TMA) kernel for the forward of the chunked Mamba2 SSD scan.

One CTA of one warpgroup per (sequence, head) walks the chunks in order with the fp32 state, held transposed
as S^T [P, N] (the layout of the initial and final states), in registers. Per chunk of C tokens (G the
chunk-local cumulative log-decay, masked at segment resets as in `pallas_common.decays`; matmul operands in
the inputs' bf16/fp16, fp32 accumulation):

    M    = (C B^T) o E o dt_j                     E_ij = e^{G_i - G_j} for j <= i in the same segment
    y    = M x + (d_in o C) S                     d_in_i = e^{G_i} while still in the carried-in segment
    S^T' = d_chunk S^T + (d_out o dt o x)^T B     d_out_j = e^{G_last - G_j} in the last segment

x, B, C are read in their own [b, t, heads or groups, dim] layout (TMA boxes of C rows, no transposing
copies), dt and G as [b, h, t] vectors; TMA brings them ``stages`` chunks ahead into tiled, 128-byte-swizzled
shared memory (one barrier per slot), and y leaves by TMA from shared memory. The four products are wgmmas:
C B^T, M x with M from registers, (d_in o C) S with S^T stored in the operand dtype and read transposed,
(...)^T B with the scaled x read transposed. Sequences too few to fill the GPU are cut into spans run side
by side (`ssd_forward_mosaic`).

On CPU the kernel runs in the GPU interpreter (`InterpretGPUParams`), which has no rules for `plgpu.load`,
`plgpu.broadcasted_iota` or transposed wgmma operands: there the same program reads refs plainly and
multiplies with `jnp.dot` (`_Ops`), so the interpreter checks the pipeline (slots, barriers, copies,
indexing) and the maths, and a lowering for CUDA (`lowering_platforms=("cuda",)`) checks the layouts.
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

F32 = jnp.float32
_WGMMA = plgpu.Layout.WGMMA
_BY_ROW, _BY_COL = _WGMMA.reduce(1), _WGMMA.reduce(0)  # [C] vectors indexed by the row i / by the column j


SMEM_BYTES = 227 * 1024  # shared memory per block on Hopper (opt-in)


def _smem_bytes(chunk: int, p: int, n: int, itemsize: int, stages: int) -> int:
    """Shared memory of the kernel: per slot x, B, C, y tiles and three fp32 vectors; once the state in the
    operand dtype, the scaled x and the fp32 state (h0 in, final state out)."""
    per_slot = chunk * (2 * p + 2 * n) * itemsize + 3 * chunk * 4
    return stages * per_slot + (n * p + chunk * p) * itemsize + n * p * 4


def fit_stages(chunk: int, p: int, n: int, itemsize: int, most: int) -> int:
    """The most slots (<= `most`, >= 1) whose buffers fit in shared memory."""
    return max([s for s in range(1, most + 1) if _smem_bytes(chunk, p, n, itemsize, s) <= SMEM_BYTES] or [1])


def unsupported(p: int, n: int, chunk: int, dtype) -> str | None:
    """Why the kernel cannot take this shape (None if it can): wgmma tiles and 128-byte swizzled rows."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"x dtype {jnp.dtype(dtype)} is not bf16/fp16 (wgmma operands)"
    for name, d in (("head_dim", p), ("d_state", n), ("chunk_size", chunk)):
        if d % 64:
            return f"{name}={d} is not a multiple of 64 (wgmma tiles, 128-byte swizzle)"
    if n * p > 128 * 128:
        return f"state {n} x {p} too large for one warpgroup's registers"
    if _smem_bytes(chunk, p, n, jnp.dtype(dtype).itemsize, 1) > SMEM_BYTES:
        return f"chunk {chunk} with head_dim {p}, d_state {n} does not fit in shared memory"
    return None


@dataclasses.dataclass(frozen=True)
class _Ops:
    """The in-kernel operations that differ between the device and the GPU interpreter."""

    interpret: bool
    chunk: int

    def load(self, ref, layout):
        return ref[...] if self.interpret else plgpu.load(ref, (), layout=layout)

    def iota(self, dim: int):
        shape = (self.chunk, self.chunk)
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=_WGMMA)

    def matmul(self, shape, *terms):
        """sum of a @ b over `terms` in fp32. An operand is a shared-memory ref, ("T", ref) for the ref read
        transposed, or a register value (the A operand only)."""
        if self.interpret:
            def value(z):  # z[...] reads a ref and is a register value itself
                return z[1][...].T if isinstance(z, tuple) else z[...]
            return sum(jnp.dot(value(a).astype(F32), value(b).astype(F32), precision=lax.Precision.HIGHEST)
                       for a, b in terms)

        def operand(z):
            return plgpu.transpose_ref(z[1], (1, 0)) if isinstance(z, tuple) else z

        def body(acc):
            for a, b in terms:
                plgpu.wgmma(acc, operand(a), operand(b))
            return acc[...]
        return pl.run_scoped(body, plgpu.ACC(shape, F32))


def _tiled(dtype) -> tuple:
    """Shared-memory transforms of a 2-D operand: (8, 128 bytes) tiles, 128-byte swizzle (wgmma, TMA)."""
    return plgpu.TilingTransform((8, 128 // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(128)


def _scan(x, b, c, dt, g, seg, h0, *, chunk: int, stages: int, with_y: bool, interpret):
    """The kernel over the inputs' own layouts: x [Bt, T, H, P], b/c [Bt, T, G, N] (c unused without y),
    dt/g [Bt, H, T] fp32, seg [Bt, T] fp32, h0 [Bt, H, P, N] fp32; T a multiple of `chunk`. Returns (y
    [Bt, T, H, P] in x's dtype, final state [Bt, H, P, N] fp32), or the final state alone (`with_y` False).
    The state is held transposed, S^T [P, N], as h0 and the final state are laid out."""
    batch_size, tp, heads, p = x.shape
    groups, n = b.shape[2:]
    n_chunks = tp // chunk
    cdt = x.dtype
    stages = min(fit_stages(chunk, p, n, jnp.dtype(cdt).itemsize, stages), n_chunks)
    ops = _Ops(bool(interpret), chunk)
    per_group = heads // groups

    def kernel(x_ref, b_ref, c_ref, dt_ref, g_ref, seg_ref, h0_ref, *refs):
        y_ref, ht_ref, *scratch = refs if with_y else (None, *refs)
        x_sm, b_sm, c_sm, dt_sm, g_sm, seg_sm, y_sm, s_sm, xs_sm, state_sm, ready, state_ready = scratch
        bi, hi = lax.axis_index("batch"), lax.axis_index("heads")
        gi = hi // per_group
        sources = [(x_ref, x_sm, lambda t: (bi, t, hi)), (b_ref, b_sm, lambda t: (bi, t, gi)),
                   (dt_ref, dt_sm, lambda t: (bi, hi, t)), (g_ref, g_sm, lambda t: (bi, hi, t)),
                   (seg_ref, seg_sm, lambda t: (bi, t))]
        if with_y:
            sources.append((c_ref, c_sm, lambda t: (bi, t, gi)))

        def fetch(i, slot):
            tokens = pl.ds(i * chunk, chunk)
            for src, dst, index in sources:
                plgpu.copy_gmem_to_smem(src.at[index(tokens)], dst.at[slot], ready.at[slot])

        for i in range(stages):
            fetch(i, i)
        plgpu.copy_gmem_to_smem(h0_ref.at[bi, hi], state_sm, state_ready)
        plgpu.barrier_wait(state_ready)
        state = ops.load(state_sm, _WGMMA)  # S^T [P, N]

        def step(i, state):
            slot = lax.rem(i, stages)
            plgpu.barrier_wait(ready.at[slot])
            x_s, b_s = x_sm.at[slot], b_sm.at[slot]
            g_i, s_i, dt_i = (ops.load(v.at[slot], _BY_ROW) for v in (g_sm, seg_sm, dt_sm))
            g_last, s_last = g_sm[slot, chunk - 1], seg_sm[slot, chunk - 1]

            def rows_of(v, width):  # a [C] vector indexed by row, spread over [C, width]
                return lax.broadcast_in_dim(v, (chunk, width), [0])

            d_out = jnp.where(s_i == s_last, jnp.exp(g_last - g_i), 0.0) * dt_i
            xs_sm[...] = (ops.load(x_s, _WGMMA).astype(F32) * rows_of(d_out, p)).astype(cdt)
            if with_y:
                s_sm[...] = state.astype(cdt)
            plgpu.commit_smem()
            if with_y:
                c_s = c_sm.at[slot]
                g_j, s_j, dt_j = (ops.load(v.at[slot], _BY_COL) for v in (g_sm, seg_sm, dt_sm))

                def square(v, dim):  # a [C] vector spread over [C, C] along `dim`
                    return lax.broadcast_in_dim(v, (chunk, chunk), [dim])

                cb = ops.matmul((chunk, chunk), (c_s, ("T", b_s)))
                live = (ops.iota(0) >= ops.iota(1)) & (square(s_i, 0) == square(s_j, 1))
                decay = jnp.exp(jnp.where(live, square(g_i, 0) - square(g_j, 1), -jnp.inf))
                m = cb * decay * square(dt_j, 1)
                d_in = jnp.where(s_i == 0, jnp.exp(g_i), 0.0)
                c_in = ops.load(c_s, _WGMMA).astype(F32) * rows_of(d_in, n)
                y = ops.matmul((chunk, p), (m.astype(cdt), x_s), (c_in.astype(cdt), ("T", s_sm)))
                plgpu.wait_smem_to_gmem(stages - 1, wait_read_only=True)  # y_sm[slot]'s last store has left
                y_sm[slot] = y.astype(cdt)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(y_sm.at[slot], y_ref.at[bi, pl.ds(i * chunk, chunk), hi])
            d_chunk = jnp.where(s_last == 0, jnp.exp(g_last), 0.0)
            state = state * d_chunk + ops.matmul((p, n), (("T", xs_sm), b_s))

            @pl.when(i + stages < n_chunks)
            def _():  # the slot's inputs are read (wgmma results waited for, a warpgroup barrier since)
                fetch(i + stages, slot)
            return state

        state = lax.fori_loop(0, n_chunks, step, state)
        state_sm[...] = state
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(state_sm, ht_ref.at[bi, hi])
        plgpu.wait_smem_to_gmem(0)

    vec = plgpu.SMEM((stages, chunk), F32)
    tile = lambda rows, d, dtype=cdt: plgpu.SMEM((*rows, d), dtype, transforms=_tiled(dtype))  # noqa: E731
    final = jax.ShapeDtypeStruct((batch_size, heads, p, n), F32)
    call = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(x.shape, cdt), final) if with_y else final,
        grid=(batch_size, heads), grid_names=("batch", "heads"),
        scratch_types=[tile((stages, chunk), p), tile((stages, chunk), n), tile((stages, chunk), n), vec, vec, vec,
                       tile((stages, chunk), p), tile((p,), n), tile((chunk,), p), tile((p,), n, F32),
                       plgpu.Barrier(num_arrivals=6 if with_y else 5, num_barriers=stages), plgpu.Barrier()],
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
    )
    return call(x, b, c, dt, g, seg, h0)


def spans_for(batch_heads: int, n_chunks: int, cores: int, min_chunks: int = 8) -> int:
    """Sequence spans per row: as many as keep batch x heads x spans CTAs within one wave over the `cores` SMs
    (one CTA per SM: its shared memory), each span >= `min_chunks` chunks (a span's state pass and the carry
    between spans cost ~1/3 of a forward)."""
    return max(1, min(cores // max(batch_heads, 1), n_chunks // min_chunks))


def ssd_forward_mosaic(
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
    """The SSD forward without the D term on Hopper: x, B, C bf16/fp16, dt discretised fp32, A fp32, reset
    at the first token of every segment, h0 fp32. Returns (y in x's dtype, final state fp32). Not
    differentiable (inference / prefill).

    ``spans``: each sequence is cut into this many spans run side by side (None: enough to fill the GPU's
    SMs, `spans_for`). A first kernel pass gives each span's final state from zero, a scan over spans
    (XLA, tiny) the state entering each span, H_s = e^{sum of dt A over span s-1} H_{s-1} + local_{s-1}
    (0 decay across a reset), and the second pass the outputs from it. ``stages``: the most chunks in
    flight (TMA slots; fewer where shared memory is short). ``interpret``: an `InterpretGPUParams` (CPU)."""
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    reason = unsupported(p, n, chunk_size, jnp.bfloat16 if interpret and x.dtype == F32 else x.dtype)
    if reason:  # (the interpreter also takes fp32 operands: the exact check of the algorithm)
        raise ValueError(f"Mosaic GPU SSD kernel: {reason}")
    if spans is None:
        cores = 132 if interpret else getattr(jax.devices()[0], "core_count", 132)
        spans = spans_for(b * h, -(-t // chunk_size), cores)
    span = -(-t // (chunk_size * spans)) * chunk_size
    pad = span * spans - t

    def split(z):  # [b, t, ...] -> [b * spans, span, ...], zero-padded (dt = 0: padded steps are identities)
        z = jnp.pad(z, [(0, 0), (0, pad)] + [(0, 0)] * (z.ndim - 2))
        return z.reshape(b * spans, span, *z.shape[2:])

    x, B, C, reset = (split(z) for z in (x, B, C, reset))
    dt = jnp.swapaxes(split(dt.astype(F32)), 1, 2)  # [b * spans, h, span]
    log_decay = dt * A.astype(F32)[:, None]
    g_cum = jnp.cumsum(log_decay.reshape(b * spans, h, span // chunk_size, chunk_size), axis=-1)
    seg = jnp.cumsum(reset.reshape(-1, span // chunk_size, chunk_size).astype(jnp.int32), axis=-1)
    seg = seg.reshape(b * spans, span).astype(F32)
    run = functools.partial(_scan, x, B, C, dt, g_cum.reshape(b * spans, h, span), seg, chunk=chunk_size,
                            stages=stages, interpret=interpret)
    h0 = h0.astype(F32)
    if spans > 1:
        local = run(jnp.zeros((b * spans, h, p, n), F32), with_y=False).reshape(b, spans, h, p, n)
        through = jnp.where(jnp.any(reset, axis=1)[:, None], 0.0, jnp.exp(jnp.sum(log_decay, axis=-1)))

        def carry(state, span_in):  # the state entering the next span
            decay, final = span_in
            state = decay[..., None, None] * state + final
            return state, state

        _, entering = lax.scan(carry, h0, (jnp.moveaxis(through.reshape(b, spans, h), 1, 0)[:-1],
                                           jnp.moveaxis(local, 1, 0)[:-1]))
        h0 = jnp.concatenate([h0[:, None], jnp.moveaxis(entering, 0, 1)], axis=1).reshape(b * spans, h, p, n)
    y, final = run(h0, with_y=True)
    return y.reshape(b, spans * span, h, p)[:, :t], final.reshape(b, spans, h, p, n)[:, -1]


@functools.cache
def interpret_params():
    """GPU interpret mode (CPU tests)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()
