"""Shared machinery of the Mosaic GPU (Hopper) chunk-scan kernels (`mosaic_ssd`, `mosaic_gdn`): one CTA walks
the chunks of a sequence with its state in registers, the chunks' inputs arriving by TMA into shared-memory
slots a few chunks ahead, matmuls as wgmmas, outputs leaving by TMA; where one warpgroup's registers are too
few, two share the slots (`two_warpgroup_loop`, `carry_state`'s `owner`).

On CPU the kernels run in the GPU interpreter (`interpret_params`), which has no rules for `plgpu.load`,
`plgpu.broadcasted_iota` or transposed wgmma operands: `Ops` swaps in plain reads and `jnp.dot` there (only
there), so the interpreter checks the pipeline and the maths, and a lowering for CUDA
(`lowering_platforms=("cuda",)`, pure Python) checks layouts, operand shapes and shared memory.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

F32 = jnp.float32
WGMMA = plgpu.Layout.WGMMA
BY_ROW, BY_COL = WGMMA.reduce(1), WGMMA.reduce(0)  # vectors indexed by the row i / by the column j
SMEM_BYTES = 227 * 1024  # shared memory per block on Hopper (opt-in)


def dtype_reason(dtype) -> str | None:
    """Why `dtype` cannot be a wgmma operand here (None for bf16 / fp16)."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"operand dtype {jnp.dtype(dtype)} is not bf16/fp16 (wgmma operands)"
    return None


def device_dtype(dtype, interpret):
    """The dtype whose shape rules apply: the interpreter also takes fp32 operands (the exact check of the
    algorithm), laid out as the device's bf16."""
    return jnp.bfloat16 if interpret and jnp.dtype(dtype) == F32 else dtype


@dataclasses.dataclass(frozen=True)
class Ops:
    """The in-kernel operations that differ between the device and the GPU interpreter."""

    interpret: bool
    chunk: int

    def load(self, ref, layout):
        return ref[...] if self.interpret else plgpu.load(ref, (), layout=layout)

    def zeros(self, shape):
        """fp32 zeros in the wgmma accumulator layout (a loop carry that wgmmas update)."""
        z = jnp.zeros(shape, F32)
        return z if self.interpret else plgpu.layout_cast(z, WGMMA)

    def iota(self, dim: int):
        shape = (self.chunk, self.chunk)
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=WGMMA)

    def square(self, v, dim: int):
        """A [C] vector spread over [C, C] along `dim` (0: v indexed by row)."""
        return lax.broadcast_in_dim(v, (self.chunk, self.chunk), [dim])

    def decay(self, g_i, s_i, g_j, s_j, *, transposed: bool = False, strict: bool = False):
        """E [i, j] = e^{G_i - G_j} for j <= i (j < i if `strict`) in the same segment, else 0; E^T [j, i] if
        `transposed`. G and the segment index by row (`g_i`, `s_i`: loaded with the row layout) and by column
        (`g_j`, `s_j`: the column layout); segment indices None: one segment."""
        rows, cols = self.iota(0), self.iota(1)
        if transposed:  # row r = j, column c = i: e^{G_c - G_r} for c >= r
            order, exponent = (cols > rows) if strict else (cols >= rows), self.square(g_j, 1) - self.square(g_i, 0)
        else:
            order, exponent = (rows > cols) if strict else (rows >= cols), self.square(g_i, 0) - self.square(g_j, 1)
        if s_i is not None:
            order = order & (self.square(s_i, 0) == self.square(s_j, 1))
        return jnp.exp(jnp.where(order, exponent, -jnp.inf))

    def matmul(self, shape, *terms, init=None, during=None):
        """`init` (fp32, default zeros) + sum of a @ b over `terms`, fp32. An operand is a shared-memory ref,
        ("T", ref) for the ref read transposed, or a register value (the A operand only). `init` starts the
        wgmma accumulator itself: no second [M, N] block in registers for the sum. `during()`, if given, runs
        once the wgmmas are issued and before they are waited for (work that overlaps them); without `init`
        the call then returns (product, what `during` returned), with `init` `during` must return nothing."""
        if self.interpret:
            def value(z):  # z[...] reads a ref and is a register value itself
                return z[1][...].T if isinstance(z, tuple) else z[...]
            total = sum(jnp.dot(value(a).astype(F32), value(b).astype(F32), precision=lax.Precision.HIGHEST)
                        for a, b in terms)
            extra = during() if during is not None else None
            total = total if init is None else init + total
            return (total, extra) if during is not None and init is None else total

        def accumulate(acc):
            for a, b in terms:
                plgpu.wgmma(acc, _operand(a), _operand(b))
            return during() if during is not None else None

        def from_zero(acc):
            extra = accumulate(acc)
            return (acc[...], extra) if during is not None else acc[...]

        if init is None:
            return pl.run_scoped(from_zero, plgpu.ACC(shape, F32))

        def with_init(acc):
            if accumulate(acc) is not None:
                raise ValueError("a product with `init` takes a `during` that returns nothing")

        return pl.run_state(with_init)(plgpu.ACC.init(init))

    def matmuls(self, *products):
        """Several `matmul`s with an `init` each, given as (terms, init), issued together and waited for once."""
        if self.interpret:
            return tuple(self.matmul(init.shape, *terms, init=init) for terms, init in products)

        def accumulate(accs):
            for acc, (terms, _) in zip(accs, products):
                for a, b in terms:
                    plgpu.wgmma(acc, _operand(a), _operand(b))

        return pl.run_state(accumulate)(tuple(plgpu.ACC.init(init) for _, init in products))


@dataclasses.dataclass(frozen=True)
class ChunkGates:
    """One chunk's gates in registers: G (the chunk-local cumulative log-decay) and the segment index within the
    chunk as vectors by row (i), their last entries, and the decays built from them. Without segments (`seg_sm`
    None: no resets) the indices are None and nothing is masked."""

    ops: Ops
    g_i: jax.Array
    s_i: jax.Array | None
    g_last: jax.Array
    s_last: jax.Array | None

    @classmethod
    def load(cls, ops: Ops, g_sm, seg_sm, slot) -> ChunkGates:
        if seg_sm is None:
            return cls(ops, ops.load(g_sm.at[slot], BY_ROW), None, g_sm[slot, ops.chunk - 1], None)
        g_i, s_i = (ops.load(v.at[slot], BY_ROW) for v in (g_sm, seg_sm))
        return cls(ops, g_i, s_i, g_sm[slot, ops.chunk - 1], seg_sm[slot, ops.chunk - 1])

    def columns(self, g_sm, seg_sm, slot):
        """G and the segment index (None without segments) by column (j)."""
        return tuple(None if v is None else self.ops.load(v.at[slot], BY_COL) for v in (g_sm, seg_sm))

    def rows_of(self, v, width: int):
        """A [C] vector indexed by row, spread over [C, width]."""
        return lax.broadcast_in_dim(v, (self.ops.chunk, width), [0])

    def cols_of(self, v, height: int):
        """A [C] vector indexed by column, spread over [height, C]."""
        return lax.broadcast_in_dim(v, (height, self.ops.chunk), [1])

    def d_in_of(self, g, s):
        """e^{G} while in the carried-in segment (segment 0), for G and segment indices of any layout."""
        return jnp.exp(g) if s is None else jnp.where(s == 0, jnp.exp(g), 0.0)

    def d_out_of(self, g, s):
        """e^{G_last - G} while in the chunk's last segment, for G and segment indices of any layout."""
        return jnp.exp(self.g_last - g) if s is None else jnp.where(s == self.s_last, jnp.exp(self.g_last - g), 0.0)

    def decay(self, g_j, s_j, transposed: bool = False):
        """E [i, j] = e^{G_i - G_j} for j <= i in the same segment (`Ops.decay`); E^T if `transposed`."""
        return self.ops.decay(self.g_i, self.s_i, g_j, s_j, transposed=transposed)

    # cached: each use would otherwise emit its exps again (the kernel is traced op by op)
    @functools.cached_property
    def d_in(self):  # by row
        return self.d_in_of(self.g_i, self.s_i)

    @functools.cached_property
    def d_out(self):  # by row
        return self.d_out_of(self.g_i, self.s_i)

    @functools.cached_property
    def d_chunk(self):  # e^{G_last} when the chunk has no reset
        return jnp.exp(self.g_last) if self.s_last is None else jnp.where(self.s_last == 0, jnp.exp(self.g_last), 0.0)


def high_low(x, cdt):
    """fp32 -> (high, low) parts in the operand dtype `cdt`, x = high + low to ~16 mantissa bits: an operand the
    kernel forms itself, taken by two wgmmas (a_high b + a_low b) where one more bf16 rounding would cost about
    as much error as the output's own."""
    high = x.astype(cdt)
    return high, (x - high.astype(F32)).astype(cdt)


def _operand(z):
    """A wgmma operand: a shared-memory ref, ("T", ref) read transposed, or a register value."""
    return plgpu.transpose_ref(z[1], (1, 0)) if isinstance(z, tuple) else z


def tiled(dtype, cols: int, swizzle: int = 128) -> tuple:
    """Shared-memory transforms of a matrix with `cols` columns: 8-row tiles as wide as the swizzle, which is
    `swizzle` bytes or the row's bytes if narrower (wgmma and TMA take 32/64/128-byte swizzles; a wgmma's two
    operands must share one)."""
    swizzle = min(swizzle, cols * jnp.dtype(dtype).itemsize)
    return plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle)


def smem(shape, dtype, swizzle: int = 128):
    """A shared-memory buffer of matrices (wgmma / TMA operands: tiled and swizzled)."""
    return plgpu.SMEM(shape, dtype, transforms=tiled(dtype, shape[-1], swizzle))


def vectors(shape):
    """A shared-memory buffer of fp32 vectors (the last axis), plain."""
    return plgpu.SMEM(shape, F32)


def nbytes(buffers) -> int:
    return sum(math.prod(b.shape) * jnp.dtype(b.dtype).itemsize for b in buffers)


def fit(slot_buffers, fixed_buffers, most: int, n_chunks: int, what: str, interpret) -> int:
    """The most TMA slots (<= `most`, <= n_chunks) whose buffers fit in shared memory, or a ValueError (the
    interpreter has no limit: its fp32 operands take twice the device's bytes)."""
    for stages in range(min(most, n_chunks), 0, -1):
        if interpret or nbytes(slot_buffers(stages) + fixed_buffers) <= SMEM_BYTES:
            return stages
    raise ValueError(f"Mosaic GPU {what} kernel: its buffers do not fit in shared memory")


def chunk_loop(step, carry, *, sources, ready, stages: int, n_chunks: int, reverse: bool, fetches: bool = True,
               release=None):
    """carry = step(i, slot, carry) over the chunks i (last to first if `reverse`), each chunk's slices of the
    `sources` (gmem ref, smem slots, index of chunk i) brought by TMA into slot i % stages, `stages` ahead.
    Several warpgroups may share the slots: one `fetches` (issues the copies), the others only wait for them, and
    `release(slot)` waits until every reader has let go of a slot before it is refilled (None: the fetching
    warpgroup is the only reader, done once its step returns)."""
    def chunk_of(k):
        return n_chunks - 1 - k if reverse else k

    def fetch(k, slot):
        for src, dst, index in sources:
            plgpu.copy_gmem_to_smem(src.at[index(chunk_of(k))], dst.at[slot], ready.at[slot])

    if fetches:
        for k in range(stages):
            fetch(k, k)

    def body(k, carry):
        slot = lax.rem(k, stages)
        plgpu.barrier_wait(ready.at[slot])
        carry = step(chunk_of(k), slot, carry)
        if fetches:
            @pl.when(k + stages < n_chunks)
            def _():  # the slot's inputs are read (wgmma results waited for, a warpgroup barrier since)
                if release is not None:
                    release(slot)
                fetch(k + stages, slot)
        return carry

    return lax.fori_loop(0, n_chunks, body, carry)


def two_warpgroup_loop(ops: Ops, carrier_step, other_step, state, *, consumed, handovers=(),
                       other_fetches: bool = False, **loop_args):
    """`chunk_loop` on two warpgroups (thread axis "wg") sharing the slots. Warpgroup 0 runs `carrier_step`
    with the carried `state` (fp32 blocks); warpgroup 1 runs `other_step` with no carry. One of them (warpgroup 0,
    or 1 if `other_fetches`: the carrier's chain then issues no copies) issues the copies and refills a slot once
    both warpgroups have arrived on its `consumed` barrier; each step arrives on `consumed[slot]` itself. At the
    end the fetching warpgroup also waits for the phases of `consumed` no refill waited for, and warpgroup 0 for
    those of each (barriers, count) in `handovers` (barriers[k % count] that warpgroup 1 arrives on every chunk);
    each waits for its own outgoing copies. Returns the carried state (zeros on warpgroup 1, made after its loop:
    the state passed in is not live there, so its registers serve warpgroup 1's step)."""
    stages, n_chunks = loop_args["stages"], loop_args["n_chunks"]

    def release(slot):
        plgpu.barrier_wait(consumed.at[slot])

    def drain(*pairs):
        for barriers, count in pairs:
            for k in range(max(n_chunks - count, 0), n_chunks):
                plgpu.barrier_wait(barriers.at[k % count])

    def carrier(state):
        state = chunk_loop(carrier_step, state, fetches=not other_fetches, release=release, **loop_args)
        drain(*handovers, *[] if other_fetches else [(consumed, stages)])
        plgpu.wait_smem_to_gmem(0)
        return state

    def other(state):
        chunk_loop(other_step, None, fetches=other_fetches, release=release, **loop_args)
        if other_fetches:
            drain((consumed, stages))
        plgpu.wait_smem_to_gmem(0)
        return jax.tree.map(lambda s: ops.zeros(s.shape), state)

    return lax.cond(lax.axis_index("wg") == 0, carrier, other, state)


def store(slots: int, *outputs) -> None:
    """Writes (value, smem slot, gmem destination) triples and sends them as one TMA group, once the group of
    `slots` steps ago has left these slots. A value None: the slot already holds it."""
    plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
    for value, slot_ref, _ in outputs:
        if value is not None:
            slot_ref[...] = value.astype(slot_ref.dtype)
    plgpu.commit_smem()
    for _, slot_ref, dst in outputs:
        plgpu.copy_smem_to_gmem(slot_ref, dst, commit_group=False)
    plgpu.commit_smem_to_gmem_group()


def send(outputs, buffers) -> None:
    """A kernel's epilogue: each (value, gmem destination) of `outputs` through its own shared-memory buffer of
    `buffers` (allocated here), as one TMA group, waited for."""
    def write(*sms):
        store(1, *((value, sm, dst) for (value, dst), sm in zip(outputs, sms, strict=True)))
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(write, *buffers)


def carry_state(ops: Ops, state_src, final_dst, loop, buffers, *, owner=None) -> None:
    """The kernel body around a chunk loop: the fp32 state block from `state_src` into registers (the wgmma
    accumulator layout; zeros, nothing loaded, if `state_src` is None), `loop(state, *buffers) -> state` with its
    shared memory, the final state to `final_dst`. Each runs in its own scope, so the loop's buffers take the
    state's staging space; the loop must have waited for its own outgoing copies. In a kernel of several
    warpgroups (thread axis "wg") the scopes are shared and only the warpgroup where `owner` holds loads and
    sends the state (zeros elsewhere).

    Every warpgroup waits for the load, also where it does not read it: Mosaic GPU keeps a kernel's barriers in
    a pool by configuration (arrivals, count) and hands a later scope's barrier of the same configuration the
    same mbarrier, whose phase parity each thread tracks in its own register. A thread that skipped a phase
    would wait for the wrong parity on that mbarrier in the loop's scope (there: a handover barrier of one
    arrival): pass one phase early, then, once the other side is a chunk ahead, wait for a phase that needs
    its own arrival first (a deadlock seen only on the device; the GPU interpreter gives each scope fresh
    barriers)."""
    scoped = pl.run_scoped if owner is None else functools.partial(pl.run_scoped, collective_axes="wg")

    def load(state_sm, barrier):
        def copy():
            plgpu.copy_gmem_to_smem(state_src, state_sm, barrier)

        if owner is None:
            copy()
            plgpu.barrier_wait(barrier)
            return ops.load(state_sm, WGMMA)
        pl.when(owner)(copy)
        plgpu.barrier_wait(barrier)  # every warpgroup: see the docstring
        return lax.cond(owner, lambda: ops.load(state_sm, WGMMA), lambda: ops.zeros(state_src.shape))

    def send(state_sm):
        state_sm[...] = state
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(state_sm, final_dst)
        plgpu.wait_smem_to_gmem(0)

    staging = smem(final_dst.shape, F32)
    state = ops.zeros(final_dst.shape) if state_src is None else scoped(load, staging, plgpu.Barrier())
    state = scoped(functools.partial(loop, state), *buffers)
    scoped(send if owner is None else lambda state_sm: pl.when(owner)(lambda: send(state_sm)), staging)


LOWERING_SEMANTICS = {"lane": plgpu.LoweringSemantics.Lane, "warpgroup": plgpu.LoweringSemantics.Warpgroup}


def compiler_params() -> plgpu.CompilerParams:
    """Every kernel's compiler settings: approximate exp / division, and lane lowering semantics (per-thread
    arrays, laid out as the kernels say), which jax 0.10 and 0.11 lower alike, so the CPU lowering tests check
    what the GPU compiles. jax 0.11's default, warpgroup semantics, runs Mosaic's layout inference, which fails
    the GDN chunk-factor kernel (H200, jax 0.11.2; now the chunk-inverse kernel). HYLO_MOSAIC_SEMANTICS=warpgroup
    picks it for experiments."""
    name = os.environ.get("HYLO_MOSAIC_SEMANTICS", "lane")
    if name not in LOWERING_SEMANTICS:
        raise ValueError(f"HYLO_MOSAIC_SEMANTICS must be one of {list(LOWERING_SEMANTICS)}, got {name!r}")
    return plgpu.CompilerParams(approx_math=True, lowering_semantics=LOWERING_SEMANTICS[name])


def gpu_kernel(body, name: str, **kwargs):
    """`plgpu.kernel` of `body` with every kernel's compiler settings and its entry point called `name` (what
    profiles and ptxas report)."""
    body.__name__ = body.__qualname__ = name
    return plgpu.kernel(body, compiler_params=compiler_params(), **kwargs)


@functools.cache
def interpret_params():
    """GPU interpret mode (CPU tests)."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()
