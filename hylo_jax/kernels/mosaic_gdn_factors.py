"""Mosaic GPU (Hopper: wgmma, TMA) kernel of the gated delta rule's chunk-local UT transform
(`gated_delta.chunk_inverse`), every chunk at once: one CTA (one warpgroup) per batch*head and run of
`default_chunks_per_cta` chunks, the next chunk's keys loaded while the CTA inverts one, with G the
chunk-local cumulative log-decay and segments as in `gated_delta._chunked`:

    E_ij = e^{G_i - G_j} for j <= i in the same segment, else 0
    T    = (I + M)^{-1},  M_ij = beta_i (k_i . k_j) E_ij for j < i
    Ag   = T diag(beta)                                   (in the operand dtype: what the passes multiply by)

(The chunk's own output weights (q k^T) o E are formed by the passes that use them, `mosaic_gdn`.)

The inverse is six block doublings of the [C, C] tile in registers: T_2 = I - L_1, and T_2s = T_s - T_s (L_s T_s)
with L_s the part of M inside the diagonal blocks of 2s rows but outside those of s rows (block triangular
inversion: the new off-diagonal blocks are -D^{-1} C A^{-1}; no power of M is formed, so nothing grows and
cancels). Each product rounds its fp32 factors to the operand dtype once (one wgmma, fp32 accumulation), as
jax-linear-attention's kernel does: on the H100 that is 1.5x faster than three wgmmas on high and low parts
(0.161 against 0.244 ms at 4 x 4096); T is then ~5e-3 from fp32 instead of ~1e-5, and the whole op's output and
gradients stay as close to fp32 as before (benchmarks/NOTES.md, session 20). The left factors stay in registers,
the right ones pass through shared memory, two buffers used in turn, so a product never overwrites what the last
one may still read. T itself (fp32) is written only when asked (`save_t`): the backward's VJP of the
inverse reads it.

On CPU the kernel runs in the GPU interpreter and is lowered for CUDA (`mosaic_common`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Float, Int

from .mosaic_common import BY_COL, BY_ROW, F32, ChunkGates, Ops, device_dtype, dtype_reason, gpu_kernel, smem, vectors
from .pallas_common import grid_cores

CHUNK = 64  # the [C, C] fp32 tiles of one warpgroup: 32 registers a thread each
TMA_BOX = 256  # the most elements a TMA box takes along one dimension


def unsupported(dk: int, chunk: int, dtype) -> str | None:
    """Why the kernel cannot take this shape (None if it can)."""
    if reason := dtype_reason(dtype):
        return reason
    if chunk != CHUNK:
        return f"chunk_size={chunk}: the chunk-inverse kernel takes chunks of {CHUNK} (wgmma rows, registers)"
    if dk % 64 or dk > TMA_BOX:
        return f"d_k={dk} must be a multiple of 64 (128-byte swizzled rows), at most {TMA_BOX} (TMA)"
    return None


def default_chunks_per_cta(rows: int, chunks: int, cores: int) -> int:
    """Chunks one CTA walks (the next one's keys prefetched while it inverts this one): the most of 8, 4, 2 that
    divides `chunks` and still leaves 1.5 CTAs an SM (two fit), else 1."""
    for per_cta in (8, 4, 2):
        if chunks % per_cta == 0 and 2 * rows * (chunks // per_cta) >= 3 * cores:
            return per_cta
    return 1


def _kernel(ops: Ops, cdt, save_t: bool, per_cta: int):
    c = ops.chunk

    def kernel(k_ref, beta_ref, g_ref, seg_ref, ag_ref, *t_ref):  # seg_ref None: no resets
        row, heads = lax.axis_index("rows"), k_ref.shape[2]
        first = lax.axis_index("chunks") * per_cta

        def at(j):  # chunk j of this CTA in the [b*h, n*C, ...] layouts
            return row, pl.ds((first + j) * c, c)

        def loop(k_sm, beta_sm, g_sm, ready, right, out_sm, *rest):
            seg_sm, t_sm = (None, rest) if seg_ref is None else (rest[0], rest[1:])

            def issue(j, slot):
                tokens = at(j)[1]  # k is in the op's [b, n*C, h, dk] layout, the segment index [b, n*C]
                for src, dst, index in ((k_ref, k_sm, (row // heads, tokens, row % heads)), (beta_ref, beta_sm, at(j)),
                                        (g_ref, g_sm, at(j)), (seg_ref, seg_sm, (row // heads, tokens))):
                    if src is not None:
                        plgpu.copy_gmem_to_smem(src.at[index], dst.at[slot], ready.at[slot])

            def products(slot):
                """M."""
                ch = ChunkGates.load(ops, g_sm, seg_sm, slot)
                below = ops.decay(ch.g_i, ch.s_i, *ch.columns(g_sm, seg_sm, slot), strict=True)
                below = below * ops.square(ops.load(beta_sm.at[slot], BY_ROW), 0)
                return ops.matmul((c, c), (k_sm.at[slot], ("T", k_sm.at[slot]))) * below

            def product(a, b, buffer: int):
                """a @ b for fp32 [C, C] tiles rounded to `cdt`, b through `right.at[buffer]` (the last product used
                the other)."""
                right.at[buffer][...] = b.astype(cdt)
                plgpu.commit_smem()
                return ops.matmul((c, c), (a.astype(cdt), right.at[buffer]))

            def invert(m):
                rows, cols = ops.iota(0), ops.iota(1)
                apart = rows ^ cols  # < s: the same diagonal block of s rows (s a power of two)
                t = jnp.where(rows == cols, 1.0, 0.0) - jnp.where(apart == 1, m, 0.0)
                s = 2
                while s < c:
                    x = product(jnp.where((apart >= s) & (apart < 2 * s), m, 0.0), t, buffer=0)
                    t = t - product(t, x, buffer=1)
                    s *= 2
                return t

            issue(0, 0)

            @pl.loop(0, per_cta)
            def _chunk(j):
                slot = lax.rem(j, 2)
                plgpu.barrier_wait(ready.at[slot])

                @pl.when(j + 1 < per_cta)
                def _prefetch():  # into the other slot: the last chunk's reads of it are done
                    plgpu.commit_smem()
                    issue(j + 1, 1 - slot)

                t = invert(products(slot))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's outputs have left out_sm, t_sm
                out_sm[...] = (t * ops.square(ops.load(beta_sm.at[slot], BY_COL), 1)).astype(cdt)
                for out, value in zip(t_sm, [t]):
                    out[...] = value
                plgpu.commit_smem()
                for sm, ref in zip((out_sm, *t_sm), (ag_ref, *t_ref)):
                    plgpu.copy_smem_to_gmem(sm, ref.at[at(j)], commit_group=False)
                plgpu.commit_smem_to_gmem_group()

            plgpu.wait_smem_to_gmem(0)

        segmented = seg_ref is not None
        pl.run_scoped(loop, smem((2, c, k_ref.shape[-1]), cdt), *[vectors((2, c))] * 2,
                      plgpu.Barrier(num_arrivals=3 + segmented, num_barriers=2), smem((2, c, c), cdt),
                      smem((c, c), cdt), *[vectors((2, c))] * segmented, *[smem((c, c), F32)] * save_t)

    return kernel


def chunk_factor(
    k: Float[Array, "b t h dk"],
    beta: Float[Array, "b h n c"],
    cum: Float[Array, "b h n c"],
    seg: Int[Array, "b 1 n c"] | None,
    *,
    save_t: bool = False,
    chunks_per_cta: int | None = None,
    interpret=None,
) -> tuple[Float[Array, "b h n c c"], ...]:
    """(Ag in k's dtype, and T fp32 if `save_t`) of every chunk (module docstring): k [b, n*C, h, dk] in the operand
    dtype (bf16 / fp16; the interpreter also takes fp32), beta and G (`cum`) fp32 and `seg` (the segment index
    within the chunk; None: no resets) in the chunk layout; `chunks_per_cta` (dividing n) defaults to
    `default_chunks_per_cta`."""
    b, h, n, chunk = beta.shape
    dk = k.shape[-1]
    if reason := unsupported(dk, chunk, device_dtype(k.dtype, interpret)):
        raise ValueError(f"Mosaic GPU GDN chunk-inverse kernel: {reason}")
    rows = b * h

    def flat(x):  # [b, h, n, C, ...] -> [b*h, n*C, ...]
        return x.reshape(rows, n * chunk, *x.shape[4:])

    if seg is not None:  # read by batch (the passes' layout), not copied per head; None: no resets, no masks
        seg = seg[:, 0].reshape(b, n * chunk).astype(F32)
    out_type = [jax.ShapeDtypeStruct((rows, n * chunk, chunk), dtype) for dtype in (k.dtype, F32)[:1 + save_t]]
    per_cta = chunks_per_cta or default_chunks_per_cta(rows, n, grid_cores(interpret))
    if n % per_cta:
        raise ValueError(f"Mosaic GPU GDN chunk-inverse kernel: {per_cta} chunks per CTA do not divide {n} chunks")
    call = gpu_kernel(_kernel(Ops(bool(interpret), chunk), k.dtype, save_t, per_cta), "gdn_chunk_factor",
                      out_type=tuple(out_type), grid=(rows, n // per_cta), grid_names=("rows", "chunks"),
                      interpret=interpret)
    outs = call(k, *(flat(x) for x in (beta.astype(F32), cum.astype(F32))), seg)
    return tuple(x.reshape(b, h, n, chunk, chunk) for x in outs)
