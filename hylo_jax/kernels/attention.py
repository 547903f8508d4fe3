"""One attention dispatch for every model: cuDNN flash attention on GPU, splash on TPU, XLA on CPU.

Layout [batch, time, heads, head_dim]; keys/values may have fewer heads (GQA). `attention` is
causal self-attention over aligned query/key sequences (training, prefill), with optional
segment ids for packed documents. `cached_attention` lets new queries attend a preallocated
cache (decode, chunked prefill): on GPU the slots before a chunk through cuDNN (with its log-sum-exp) and
the chunk's own through the flash block kernel (`flash_block`), elsewhere an XLA online softmax.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention  # fp32 lse (jax.nn rounds it)
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int

from . import flash_block
from .pallas_common import on_mesh

log = logging.getLogger(__name__)

IMPLS = ("auto", "xla", "cudnn", "splash")
_SPLASH_BLOCK = 512


def _pad_values(v: jax.Array, dim: int) -> jax.Array:
    """Pads v's head_dim to `dim` (kernels need equal q/k/v head dims); callers slice it off."""
    return jnp.pad(v, [(0, 0)] * 3 + [(0, dim - v.shape[-1])])


def resolve_impl(impl: str, seq_len: int, segment_ids: jax.Array | None) -> str:
    """The concrete kernel for `impl` on the default backend ("auto" picks per backend)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "gpu":
        return "cudnn"
    if backend == "tpu":
        if seq_len % _SPLASH_BLOCK == 0:
            return "splash"
        log.info("attention: T=%d is not a multiple of %d, using XLA on TPU", seq_len, _SPLASH_BLOCK)
    return "xla"


def attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t hk d"],
    v: Float[Array, "b t hk dv"],
    *,
    segment_ids: Int[Array, "b t"] | None = None,
    scale: float | None = None,
    impl: str = "auto",
    max_segments: int = 0,
    interpret: bool = False,
) -> Float[Array, "b t h dv"]:
    """softmax(q k^T * scale + causal/segment mask) v, with key/value heads shared by groups.

    Segments are runs of equal ids. With `max_segments` (an upper bound on the runs of any row) cuDNN
    takes them in its packed layout (`segment_layout`) instead of a dense [T, T] mask; a row with more
    runs comes out NaN, never silently wrong."""
    b, t, h, d = q.shape
    if k.shape[:2] != (b, t) or v.shape[:2] != (b, t) or k.shape[-1] != d or k.shape[2] != v.shape[2]:
        raise ValueError(f"attention shapes do not match: q {q.shape}, k {k.shape}, v {v.shape}")
    if h % k.shape[2]:
        raise ValueError(f"query heads {h} not a multiple of key/value heads {k.shape[2]}")
    scale = d ** -0.5 if scale is None else scale
    dv = v.shape[-1]
    if dv != d:
        v = _pad_values(v, d) if dv < d else v
        if dv > d:
            raise ValueError(f"value head_dim {dv} larger than query head_dim {d} is not supported")
    kind = resolve_impl(impl, t, segment_ids)
    if kind == "splash":
        out = _splash(q, k, v, segment_ids, scale, interpret)
    elif kind == "cudnn" and segment_ids is not None and max_segments:
        lengths, offsets, runs = segment_layout(segment_ids, max_segments)
        out = cudnn_attention.dot_product_attention(
            q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets, scale=scale,
            mask_type=cudnn_attention.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
        out = jnp.where((runs > max_segments)[:, None, None, None], jnp.nan, out)
    else:
        mask = None
        if segment_ids is not None:
            mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                           implementation=kind)
    return out[..., :dv]


def segment_layout(segment_ids: Int[Array, "b t"], max_segments: int
                   ) -> tuple[Int[Array, "b m"], Int[Array, "b m1"], Int[Array, "b"]]:
    """cuDNN's packed layout of each row's runs of equal segment ids, in order: (lengths [b, M],
    offsets [b, M + 1]), entries past a row's last run -1, and each row's number of runs. Rows must have
    at most M runs (the trainer checks its batches; a longer row would lose its tail: `attention` turns
    it into NaN)."""
    b, t = segment_ids.shape
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    first = jax.vmap(lambda row: jnp.nonzero(row, size=max_segments + 1, fill_value=t)[0])(starts)
    runs = jnp.sum(starts, axis=1)
    used = jnp.arange(max_segments + 1) < runs[:, None]
    lengths = jnp.where(used[:, :-1], first[:, 1:] - first[:, :-1], -1)
    return lengths.astype(jnp.int32), jnp.where(used, first, -1).astype(jnp.int32), runs


def count_segments(segment_ids) -> int:
    """The most runs of equal ids in any row (host arrays): what `max_segments` must cover."""
    segment_ids = np.asarray(segment_ids)
    return int(np.max(1 + np.sum(segment_ids[:, 1:] != segment_ids[:, :-1], axis=1)))


CACHE_BLOCK = 1024  # granularity of cache slots: caches longer than this hold a multiple of it
SCORES_BYTES = 1 << 28  # fp32 scores of one `cached_attention` step (sets its keys per step)
EXPANDED_BYTES = 1 << 28  # expanded keys + values of one step of the kernel path (sets its keys per step)
CACHED_IMPLS = ("auto", "xla", "pallas")


def cache_slots(max_len: int) -> int:
    """Slots to allocate for `max_len` tokens: a whole number of `CACHE_BLOCK`s once past one block."""
    return max_len if max_len <= CACHE_BLOCK else -(-max_len // CACHE_BLOCK) * CACHE_BLOCK


def cached_attention(
    q: Float[Array, "b tq g qh d"],
    keys: Float[Array, "b s gs ds"],
    values: Float[Array, "b s gs dvs"],
    *,
    q_positions: Int[Array, "b tq"],
    kv_length: Int[Array, "b"],
    scale: float | None = None,
    expand: Callable[[Array, Array], tuple[Array, Array]] | None = None,
    impl: str = "auto",
) -> Float[Array, "b tq g qh dv"]:
    """Queries at absolute `q_positions` attend cache slots j with j <= position and j < kv_length.

    `expand(keys block, values block) -> (keys, values)`, when given, maps each visited block of the stored
    cache to the keys and values actually attended (e.g. MLA's latent decompressed per head group), so
    only one block's worth ever exists expanded.

    Query heads come grouped per key/value head (g groups of qh). Keys are visited in steps of whole
    `CACHE_BLOCK`s, as many as keep a step's scores within `SCORES_BYTES` (one decode token takes a
    2M-slot cache in a few steps; a prefill chunk of 8K queries one block at a time), with an online
    softmax (running max m, normaliser l, fp32 accumulator), and only up to the longest row's
    `kv_length`: memory is O(max(SCORES_BYTES, tq x CACHE_BLOCK scores)), time O(tq x kv_length),
    whatever the cache's size, so a long prompt can be prefilled chunk by chunk and decode cost follows
    the context.

    `impl`: "pallas" visits blocks with flash kernels (cuDNN for slots every query sees, the flash block
    kernel for the rest) and merges steps by their log-sum-exp (`_flash_cached`; interpreted off GPU),
    "xla" the online softmax above, "auto" the kernels on GPU where they take the shapes (prefill chunks:
    queries a multiple of 16), else XLA.
    """
    expand = expand or _as_stored
    b, s = keys.shape[:2]
    g, d = q.shape[2], q.shape[4]
    scale = d ** -0.5 if scale is None else scale
    if s > CACHE_BLOCK and s % CACHE_BLOCK:
        raise ValueError(f"cache of {s} slots is not a multiple of {CACHE_BLOCK}; allocate it with cache_slots()")
    tq, qh = q.shape[1], q.shape[3]
    if _cached_kernel_takes(impl, q, keys, values, expand):
        flash = functools.partial(_flash_cached, scale=scale, expand=expand,
                                  interpret=jax.default_backend() != "gpu")
        # Per device over batch rows, and over KV heads when the cache has them (not MLA's shared latent).
        split_heads = expand is _as_stored and keys.shape[2] == g

        def specs(rows, heads):
            heads = heads if split_heads else None
            return ((P(rows, None, heads), P(rows, None, heads), P(rows, None, heads), P(rows), P(rows)),
                    P(rows, None, heads))

        return on_mesh(flash, specs, b, g)(q, keys, values, q_positions, kv_length)
    # Keys per loop step: whole CACHE_BLOCKs, as many as keep one step's fp32 scores within SCORES_BYTES
    # (decode takes a long cache in a few steps; a prefill chunk of many queries in blocks of CACHE_BLOCK),
    # balanced over the steps that takes so that the last step's overlap is less than one CACHE_BLOCK.
    per_key = b * g * qh * tq * 4
    steps = -(-s // max(CACHE_BLOCK, SCORES_BYTES // per_key // CACHE_BLOCK * CACHE_BLOCK))
    block = min(s, -(-s // steps // CACHE_BLOCK) * CACHE_BLOCK)
    q = q.astype(keys.dtype)
    neg = jnp.finfo(jnp.float32).min

    def step(i, carry):
        m, l, acc = carry
        start = jnp.minimum(i * block, s - block)  # the last step may overlap the one before it:
        k_blk, v_blk = expand(jax.lax.dynamic_slice_in_dim(keys, start, block, axis=1),
                              jax.lax.dynamic_slice_in_dim(values, start, block, axis=1))
        slots = start + jnp.arange(block)
        ok = (slots >= i * block) & (slots <= q_positions[:, :, None]) & (slots < kv_length[:, None, None])
        ok = ok[:, None, None]  # [b, 1, 1, tq, block]; slots seen in an earlier step are masked out above
        scores = jnp.einsum("btgqd,bsgd->bgqts", q, k_blk, preferred_element_type=jnp.float32) * scale
        m_new = jnp.maximum(m, jnp.max(jnp.where(ok, scores, neg), axis=-1))
        p = jnp.where(ok, jnp.exp(scores - m_new[..., None]), 0.0)
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(p, axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("bgqts,bsgv->bgqtv", p.astype(v_blk.dtype), v_blk,
                                                       preferred_element_type=jnp.float32)
        return m_new, l, acc

    attended_values = jax.eval_shape(expand, keys[:, :block], values[:, :block])[1]
    dv = attended_values.shape[-1]
    carry = (jnp.full((b, g, qh, tq), neg, jnp.float32), jnp.zeros((b, g, qh, tq), jnp.float32),
             jnp.zeros((b, g, qh, tq, dv), jnp.float32))
    n_blocks = jnp.minimum(-(-jnp.max(kv_length) // block), -(-s // block))
    _, l, acc = jax.lax.fori_loop(0, n_blocks, step, carry)
    out = acc / jnp.maximum(l, jnp.finfo(jnp.float32).tiny)[..., None]
    return out.transpose(0, 3, 1, 2, 4).astype(attended_values.dtype)


def cached_impl(attention_impl: str) -> str:
    """The `cached_attention` impl that follows a model's `attention_impl`: XLA when it asks for XLA."""
    return "xla" if attention_impl == "xla" else "auto"


def _cached_kernel_takes(impl: str, q, keys, values, expand) -> bool:
    """Whether `cached_attention` takes the flash block kernel (see its `impl`), logging why not when asked."""
    if impl not in CACHED_IMPLS:
        raise ValueError(f"cached attention impl {impl!r} is not one of {CACHED_IMPLS}")
    if impl == "xla" or (impl == "auto" and jax.default_backend() != "gpu"):
        return False
    k, v = jax.eval_shape(expand, keys[:, :1], values[:, :1])
    # Steps attend the whole cache (s <= CACHE_BLOCK) or whole CACHE_BLOCKs.
    reason = flash_block.unsupported(q.shape[1], min(keys.shape[1], CACHE_BLOCK), k.shape[-1], v.shape[-1])
    if reason and impl == "pallas":
        log.warning("cached_attention impl='pallas': XLA attends instead: %s", reason)
    return reason is None


def _flash_cached(q, keys, values, q_positions, kv_length, *, scale: float, expand: Callable,
                  interpret: bool) -> Array:
    """`cached_attention` on flash kernels: each step expands a block of the cache, attends it and merges
    by lse (`flash_block.merge`).

    Slots every query of every row sees whole (below the first query position and every row's kv_length,
    rounded down to a `CACHE_BLOCK`: all of a long prefill chunk's past) are visited backwards from that
    bound in blocks within EXPANDED_BYTES, on an unmasked kernel (`_unmasked_attend`: cuDNN on GPU; the
    first block, clamped at slot 0, attends only its keys below the next one). The rest, up to the longest
    kv_length, goes in steps of the chunk plus one `CACHE_BLOCK` to the flash block kernel with positions
    (a step clamped at the cache's end masks its slots seen before, as it does slots >= kv_length)."""
    b, tq, g, qh, d = q.shape
    s = keys.shape[1]
    k1, v1 = jax.eval_shape(expand, keys[:, :1], values[:, :1])
    per_key = k1.size * k1.dtype.itemsize + v1.size * v1.dtype.itemsize
    steps = -(-s // max(CACHE_BLOCK, EXPANDED_BYTES // per_key // CACHE_BLOCK * CACHE_BLOCK))
    block = min(s, -(-s // steps // CACHE_BLOCK) * CACHE_BLOCK)
    tail = min(block, -(-(tq + CACHE_BLOCK) // CACHE_BLOCK) * CACHE_BLOCK)
    q = q.reshape(b, tq, g * qh, d).astype(k1.dtype)
    q_segments = jnp.zeros((b, tq), jnp.int32)

    def expanded(start, size):
        k_blk, v_blk = expand(jax.lax.dynamic_slice_in_dim(keys, start, size, axis=1),
                              jax.lax.dynamic_slice_in_dim(values, start, size, axis=1))
        return k_blk, v_blk.astype(k_blk.dtype)

    bound = jnp.minimum(jnp.min(q_positions) + 1, jnp.min(kv_length))
    whole = jnp.clip(bound // CACHE_BLOCK * CACHE_BLOCK, 0, s)  # slots [0, whole) are seen by every query

    def whole_step(i, acc):
        end = whole - i * block
        start = jnp.maximum(end - block, 0)
        o_j, lse_j = _unmasked_attend(q, *expanded(start, block), jnp.full((b,), end - start),
                                      scale=scale, interpret=interpret)
        return flash_block.merge(*acc, lse_j, o_j)

    def masked_step(i, acc):
        first = whole + i * tail
        start = jnp.minimum(first, s - tail)
        slots = start + jnp.arange(tail, dtype=jnp.int32)
        fresh = (slots[None] >= first) & (slots[None] < kv_length[:, None])
        o_j, lse_j = flash_block.flash_block(q, *expanded(start, tail), q_positions, slots, q_segments,
                                             jnp.where(fresh, 0, 1), scale=scale, interpret=interpret)
        return flash_block.merge(*acc, lse_j, o_j)

    init = (jnp.full((b, g * qh, tq), flash_block.NEG, jnp.float32),
            jnp.zeros((b, tq, g * qh, v1.shape[-1]), jnp.float32))
    acc = jax.lax.fori_loop(0, -(-whole // block), whole_step, init)
    _, o = jax.lax.fori_loop(0, -(-(jnp.max(kv_length) - whole) // tail), masked_step, acc)
    return o.reshape(b, tq, g, qh, -1).astype(v1.dtype)


def _unmasked_attend(q: Float[Array, "b tq h d"], k: Float[Array, "b tk g d"], v: Float[Array, "b tk g dv"],
                     valid: Int[Array, "b"], *, scale: float, interpret: bool
                     ) -> tuple[Float[Array, "b tq h dv"], Float[Array, "b h tq"]]:
    """(o, lse) of q attending the first `valid` keys of each row, with no other mask: cuDNN's flash
    attention where it takes the shapes (GPU, 16-bit, head dims <= 128 and multiples of 8), else the
    flash block kernel."""
    b, tq, _, d = q.shape
    tk, dv = k.shape[1], v.shape[-1]
    if (not interpret and q.dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0 and dv % 8 == 0
            and max(d, dv) <= 128):
        width = max(d, dv)
        o, lse = cudnn_attention.dot_product_attention(
            *(_pad_values(x, width) for x in (q, k, v)), q_seqlen=jnp.full((b,), tq, jnp.int32),
            kv_seqlen=valid.astype(jnp.int32), scale=scale, mask_type=cudnn_attention.MaskType.PADDING,
            qkv_layout="BTNH", return_residual=True)
        return o[..., :dv].astype(jnp.float32), lse
    zeros = jnp.zeros((b, tq), jnp.int32)
    k_segments = (jnp.arange(tk)[None] >= valid[:, None]).astype(jnp.int32)
    return flash_block.flash_block(q, k, v, zeros, jnp.zeros((b, tk), jnp.int32), zeros, k_segments,
                                   scale=scale, interpret=interpret)


def latent_cached_attention(
    q: Float[Array, "b tq h l"],
    latent: Float[Array, "b s l"],
    *,
    rank: int,
    q_positions: Int[Array, "b tq"],
    kv_length: Int[Array, "b"],
    scale: float,
) -> Float[Array, "b tq h r"]:
    """`cached_attention` where every head attends one shared cache of x_j = [c_j ; k_rope_j] (MLA's
    absorbed form): keys x_j, values c_j = x_j[:rank]. The values are sliced per visited block, never
    from the whole cache (that slice would copy the cache on every call)."""
    stored = latent[:, :, None, :]
    return cached_attention(q[:, :, None], stored, stored, q_positions=q_positions, kv_length=kv_length,
                            scale=scale, expand=lambda keys, values: (keys, values[..., :rank]))[:, :, 0]


def _as_stored(keys: Array, values: Array) -> tuple[Array, Array]:
    return keys, values


def _splash(q, k, v, segment_ids, scale, interpret):
    """TPU splash attention: one MQA kernel per key/value head, vmapped over batch and kv heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, d = q.shape
    hk = k.shape[2]
    group = h // hk
    block = min(_SPLASH_BLOCK, t)
    kernel = sk.make_splash_mqa_single_device(
        sm.MultiHeadMask([sm.CausalMask((t, t))] * group),
        block_sizes=sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                  block_q_dkv=block, block_kv_dkv=block,
                                  block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block),
        interpret=interpret)
    # [b, hk, group, t, d] queries; [b, hk, t, d] keys and values.
    qg = (q * scale).reshape(b, t, hk, group, d).transpose(0, 2, 3, 1, 4)
    kg, vg = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def one(qh, kh, vh, seg):
        ids = None if seg is None else sk.SegmentIds(q=seg, kv=seg)
        return kernel(qh, kh, vh, segment_ids=ids)

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
    out = jax.vmap(per_head, in_axes=(0, 0, 0, 0 if segment_ids is not None else None))(
        qg, kg, vg, segment_ids)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
