"""Flash decoding over an MLA latent cache: one new token per row attends every cached latent, each
latent read from HBM once (Pallas, GPU Triton backend; interpret mode on CPU).

With absorbed queries q_h = [q_nope_h W_UK^T ; q_rope_h] (all heads share the cache) and cached latents
x_j = [c_j ; k_rope_j], per row:  o_h = sum_j softmax_j(scale q_h . x_j) c_j  over slots j < limit.

At B = 1 the keys are the whole cost (2M tokens x 160 bf16 = 0.67 GB per layer at HyLo-1B's latent;
2.4 GB at DeepSeek's 576), so the slots are split over many programs (grid rows x splits). Each program
walks its split in blocks of `DecodeTiling.block` slots,
loads the block once and uses it twice: scores against [c ; k_rope], then p @ c, with an online
softmax (running max m, normaliser l, fp32 accumulator [heads, r]); programs past a row's limit do no
work. The splits are merged in XLA through their (m, l): o = sum_s e^{m_s - M} acc_s / sum_s e^{m_s - M} l_s.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from .pallas_common import is_pow2, on_mesh


@dataclasses.dataclass(frozen=True)
class DecodeTiling:
    """Launch shape (`benchmarks/decode_attention.py --sweep` times choices): cache slots per loop step
    (halved down to 16 for caches that are not a multiple of it), splits x rows to aim for (waves over
    the SMs), each split at least `min_blocks` steps long, Triton warps and pipeline stages. The default
    is the H100 sweep's best at HyLo-1B's latent (32 heads, r 128, d_rope 32) and 2M slots: 0.42 ms per
    layer (128/264/8/2: 0.47-0.52 ms); at DeepSeek's (r 512, d_rope 64) 128/264/8/2 is best, 1.07 ms."""

    block: int = 64
    programs: int = 264
    min_blocks: int = 4
    warps: int = 4
    stages: int = 3

    def fit(self, slots: int) -> DecodeTiling | None:
        """This tiling with the largest block (<= `block`, >= 16) that divides `slots`; None if none does."""
        block = self.block
        while block >= 16:
            if slots % block == 0:
                return dataclasses.replace(self, block=block)
            block //= 2
        return None


DEFAULT_TILING = DecodeTiling()
_NEG = float(jnp.finfo(jnp.float32).min)
_LIMIT_LANES = 16  # the per-row limit is passed as a [rows, 16] vector (no scalar loads in the kernel)


def unsupported(heads: int, rank: int, rope_dim: int, slots: int,
                tiling: DecodeTiling = DEFAULT_TILING) -> str | None:
    """Why the kernel cannot take this shape (None if it can)."""
    for name, d in (("heads", heads), ("kv_lora_rank", rank), ("qk_rope_head_dim", rope_dim)):
        if not is_pow2(d) or d < 16:
            return f"{name}={d} is not a power of two >= 16 (Triton block shapes)"
    if tiling.fit(slots) is None:
        return f"a cache of {slots} slots is not a multiple of 16"
    return None


def split_size(rows: int, slots: int, tiling: DecodeTiling = DEFAULT_TILING) -> int:
    """Slots per program: enough programs to fill the GPU, whole blocks, at least `min_blocks` blocks."""
    block = tiling.block
    want = -(-slots // max(1, tiling.programs // rows))
    return min(-(-slots // block) * block, max(tiling.min_blocks * block, -(-want // block) * block))


def latent_decode_attention(
    q: Float[Array, "b h l"],
    latent: Float[Array, "b s l"],
    limit: Int[Array, "b"],
    *,
    rank: int,
    scale: float,
    interpret: bool = False,
    tiling: DecodeTiling = DEFAULT_TILING,
) -> Float[Array, "b h r"]:
    """softmax_j(scale q . latent_j) c_j over slots j < limit (c_j = latent_j[:rank]); fp32 out.
    Under a set multi-device mesh it runs per device over batch rows (`on_mesh`; all heads per device)."""

    def specs(rows, _heads):
        return (P(rows, None, None), P(rows, None, None), P(rows)), P(rows, None, None)

    return on_mesh(functools.partial(_decode, rank=rank, scale=scale, interpret=interpret, tiling=tiling), specs,
                   q.shape[0], q.shape[1])(q, latent, limit)


def _decode(q, latent, limit, *, rank: int, scale: float, interpret: bool, tiling: DecodeTiling):
    b, h, width = q.shape
    s = latent.shape[1]
    reason = unsupported(h, rank, width - rank, s, tiling)
    if reason:
        raise ValueError(f"latent_decode_attention: {reason}")
    tiling = tiling.fit(s)
    split = split_size(b, s, tiling)
    n_splits = -(-s // split)
    lanes = jnp.broadcast_to(limit.astype(jnp.int32)[:, None], (b, _LIMIT_LANES))
    acc, m, l = _call(q.astype(latent.dtype), latent, lanes, rank=rank, scale=scale, split=split,
                      n_splits=n_splits, interpret=interpret, tiling=tiling)
    top = jnp.max(m, axis=1, keepdims=True)
    weight = jnp.exp(m - top)  # [b, splits, h]; empty splits have m = -inf-ish, weight 0
    num = jnp.einsum("bsh,bshr->bhr", weight, acc)
    den = jnp.einsum("bsh,bsh->bh", weight, l)
    return num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)[..., None]


@functools.partial(jax.jit, static_argnames=("rank", "scale", "split", "n_splits", "interpret", "tiling"))
def _call(q, latent, lanes, *, rank: int, scale: float, split: int, n_splits: int, interpret: bool,
          tiling: DecodeTiling):
    b, h, width = q.shape
    rope = width - rank
    block = tiling.block

    def kernel(q_ref, lat_ref, lim_ref, acc_ref, m_ref, l_ref):
        row, part = pl.program_id(0), pl.program_id(1)
        limit = jnp.min(lim_ref[row, :])
        start = part * split
        q_c, q_r = q_ref[row, :, pl.ds(0, rank)], q_ref[row, :, pl.ds(rank, rope)]
        blocks = jnp.clip((limit - start + block - 1) // block, 0, split // block)

        def body(i, carry):
            m, l, acc = carry
            first = start + i * block
            c = lat_ref[row, pl.ds(first, block), pl.ds(0, rank)]
            k_rope = lat_ref[row, pl.ds(first, block), pl.ds(rank, rope)]
            scores = (_dot_t(q_c, c) + _dot_t(q_r, k_rope)) * scale  # [h, block]
            ok = (first + lax.broadcasted_iota(jnp.int32, (1, block), 1)) < limit
            m_new = jnp.maximum(m, jnp.max(jnp.where(ok, scores, _NEG), axis=1))
            p = jnp.where(ok, jnp.exp(scores - m_new[:, None]), 0.0)
            correction = jnp.exp(m - m_new)
            acc = acc * correction[:, None] + lax.dot_general(
                p.astype(c.dtype), c, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            return m_new, l * correction + jnp.sum(p, axis=1), acc

        init = (jnp.full((h,), _NEG, jnp.float32), jnp.zeros((h,), jnp.float32),
                jnp.zeros((h, rank), jnp.float32))
        m, l, acc = lax.fori_loop(0, blocks, body, init)
        acc_ref[row, part] = acc
        m_ref[row, part] = m
        l_ref[row, part] = l

    sds = jax.ShapeDtypeStruct
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as pltriton

        params = pltriton.CompilerParams(num_warps=tiling.warps, num_stages=tiling.stages)
    return pl.pallas_call(
        kernel,
        out_shape=[sds((b, n_splits, h, rank), jnp.float32), sds((b, n_splits, h), jnp.float32),
                   sds((b, n_splits, h), jnp.float32)],
        grid=(b, n_splits),
        interpret=interpret,
        compiler_params=params,
    )(q, latent, lanes)


def _dot_t(a, b):
    """a @ b^T with fp32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
