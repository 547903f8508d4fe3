"""Context (sequence) parallelism over the mesh's `sequence` axis, for training and prefill.

Each `sequence` shard holds a contiguous slice of every row (or, with `load_balance`, two zig-zag
chunks: shard s holds chunks s and 2S-1-s of 2S, so causal attention work is equal per shard).
Mixers call these functions on *global* arrays; each one is a `jax.shard_map` over the whole mesh
(batch on (data, fsdp), time on sequence, heads on tensor where they divide) around local kernels:

* attention (teacher GQA, `attention`) and MLA (`mla_attention`): blockwise causal attention of the
  local queries against every key block: on GPU the flash block kernel (`kernels.flash_block`, (o, lse)
  per block merged by log-sum-exp), elsewhere an fp32 online softmax in XLA. The payload that travels is
  K/V for GQA and only the per-token latent [c_KV ; rope(k_rope)] for MLA, decompressed locally
  (kv_b_proj) block by block. mode "allgather": one all_gather of the payload, then a scan over
  blocks; mode "ring": S-1 `ppermute`s of the payload, each issued before the block that uses
  the previous one, so XLA overlaps the transfer with that block's compute. Fully masked (future)
  blocks are skipped with `lax.cond`. Masks use global token indices and segment ids.
* Mamba2 (`ssd`): each shard scans from a zero state; its affine summary S -> a S + F (a = the
  scalar decay exp(sum dt A) per head, zero after a document reset; F the local final state) is
  all_gathered and folded (exclusive prefix, O(S) small ops). The output correction is linear and
  exact: y_t += cum_t C_t . S_in, with the per-token cumulative decay cum_t from a width-1 run of
  the same kernel (x = 0, state = ones). Extra cost ~ (1 + 1/P) x of one einsum per token.
* Gated DeltaNet (`gated_delta_rule`): the summary is S -> M S + F with M = prod_t a_t (I - b_t k_t
  k_t^T) (dk x dk per head), obtained from ONE kernel run with v augmented by dk zero columns and
  initial state [0 | I] (final state = [F | M]; a reset inside the shard zeroes M). After the fold
  the kernel is rerun with the true incoming state for the outputs. Cost: the kernel at width
  dv + dk, then at width dv: (2 dv + dk) / dv = 2.5x the single-device kernel for HyLo's dv = 2 dk
  (the q/k-only chunk work, the UT transform, is done twice). No extra memory beyond [S, dk, dk+dv].
* Causal conv (`causal_conv1d`): the last K-1 inputs of each shard go to the next by `ppermute`
  (all_gather of these tiny tails in the zig-zag layout), masked to the receiving shard's first
  document.

Documents crossing a shard boundary: a shard's incoming state/prefix is kept only if its first
token has the segment id of the previous chunk's last token (ids of one document are contiguous,
as packing produces). Settings (mode, load balance) are per run: `settings(...)` as a context
manager around tracing; `active_mesh()` says whether a model should take these paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from hylo_jax.errors import MeshError
from hylo_jax.kernels import flash_block
from hylo_jax.kernels.gated_delta import gated_delta_rule as _gdn_kernel
from hylo_jax.kernels.ssd import ssd as _ssd_kernel
from hylo_jax.sharding import batch_axes, heads_axis

log = logging.getLogger(__name__)
SEQ = "sequence"
_F32 = jnp.float32
_NEG = -1e30  # finite "minus infinity" of masked scores


@dataclasses.dataclass(frozen=True)
class ContextSettings:
    """How context parallelism runs (not part of any model: a property of the run)."""

    mode: Literal["allgather", "ring"] = "allgather"
    load_balance: bool = False
    attention: Literal["auto", "xla", "pallas"] = "auto"


_CURRENT = [ContextSettings()]


@contextlib.contextmanager
def settings(mode: str = "allgather", load_balance: bool = False, attention: str = "auto"):
    """Context-parallel settings for code traced inside this block (jit caches do not see them:
    use one setting per compiled step). attention: the block kernel ("auto": the Pallas flash block
    kernel on GPU, XLA elsewhere; "pallas" off GPU runs it in interpret mode)."""
    if mode not in ("allgather", "ring"):
        raise ValueError(f"context_parallel must be 'allgather' or 'ring', got {mode!r}")
    if attention not in ("auto", "xla", "pallas"):
        raise ValueError(f"context-parallel attention must be 'auto', 'xla' or 'pallas', got {attention!r}")
    _CURRENT.append(ContextSettings(mode, bool(load_balance), attention))
    try:
        yield _CURRENT[-1]
    finally:
        _CURRENT.pop()


def current() -> ContextSettings:
    return _CURRENT[-1]


def active_mesh():
    """The current (abstract) mesh when its `sequence` axis is larger than 1, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or SEQ not in mesh.axis_names or mesh.shape[SEQ] == 1:
        return None
    return mesh


# --------------------------------------------------------------------------------------------
# Layout: which global tokens a shard holds.


def zigzag_order(length: int, shards: int) -> np.ndarray:
    """perm with x[:, perm] laid out for the zig-zag split: shard s holds chunks s, 2S-1-s."""
    if length % (2 * shards):
        raise MeshError(f"sequence length {length} is not divisible by 2 * sequence shards = {2 * shards} "
                        "(load-balanced context parallelism)")
    c = length // (2 * shards)
    chunks = [j for s in range(shards) for j in (s, 2 * shards - 1 - s)]
    return np.concatenate([np.arange(j * c, (j + 1) * c) for j in chunks])


def zigzag_inverse(length: int, shards: int) -> np.ndarray:
    return np.argsort(zigzag_order(length, shards))


def check_sequence(mesh, seq_len: int, *, load_balance: bool, conv_kernel: int = 1) -> None:
    """`MeshError` (before compiling) unless `seq_len` splits into whole shards (and zig-zag chunks)
    each at least as long as the widest conv's history."""
    shards = dict(mesh.shape).get(SEQ, 1)
    if shards == 1:
        return
    _check_length(mesh, seq_len, load_balance)
    chunk = seq_len // (shards * _halves(load_balance))
    if chunk < conv_kernel - 1:
        raise MeshError(f"sequence shards of {chunk} tokens are shorter than the conv history "
                        f"({conv_kernel - 1} tokens): use fewer sequence shards or longer sequences")


def relayout(batch: dict) -> dict:
    """The zig-zag layout of a [b, t] batch when load balancing on a sequence mesh (else the batch):
    every key is permuted the same way along time, which losses summed over tokens do not see."""
    mesh = active_mesh()
    if mesh is None or not current().load_balance:
        return batch
    return {k: v[:, zigzag_order(v.shape[1], mesh.shape[SEQ])] for k, v in batch.items()}


def _halves(zigzag: bool) -> int:
    return 2 if zigzag else 1


def _chunk_ids(s, shards: int, zigzag: bool):
    """Global chunk index of each of shard s's halves (chunks of t_local / halves tokens)."""
    if zigzag:
        return jnp.stack([s, 2 * shards - 1 - s])
    return jnp.reshape(s, (1,))


def _token_index(s, t_local: int, shards: int, zigzag: bool):
    """Global token index of each local token of shard s."""
    nh = _halves(zigzag)
    c = t_local // nh
    return (_chunk_ids(s, shards, zigzag)[:, None] * c + jnp.arange(c)).reshape(-1)


def _chunk_table(shards: int, zigzag: bool) -> tuple[np.ndarray, np.ndarray]:
    """(shard, half) of every global chunk, in order."""
    if not zigzag:
        return np.arange(shards), np.zeros(shards, int)
    j = np.arange(2 * shards)
    return np.where(j < shards, j, 2 * shards - 1 - j), (j >= shards).astype(int)


# --------------------------------------------------------------------------------------------
# shard_map plumbing.


def _check_length(mesh, t: int, zigzag: bool) -> None:
    n = mesh.shape[SEQ] * _halves(zigzag)
    if t % n:
        raise MeshError(f"sequence length {t} is not divisible by the mesh's sequence axis "
                        f"({mesh.shape[SEQ]} shards{', x2 zig-zag chunks' if zigzag else ''})")


def _segments(segment_ids, b: int, t: int):
    return jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)


def _shard_map(f, mesh, in_specs, out_specs, check_vma: bool = True):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma)


def _prev_tails(tails, first_seg, last_seg, zigzag: bool):
    """For each local half: the previous global chunk's tails (pytree of [nh, b, ...]) and whether
    its document continues here (previous chunk's last id == this half's first id); False for chunk 0.
    `first_seg`, `last_seg`: [nh, b]."""
    shards = jax.lax.axis_size(SEQ)
    s = jax.lax.axis_index(SEQ)
    if not zigzag:
        perm = [(i, i + 1) for i in range(shards - 1)]
        prev = jax.tree.map(lambda x: jax.lax.ppermute(x, SEQ, perm), tails)
        prev_last = jax.lax.ppermute(last_seg, SEQ, perm)
        keep = (prev_last == first_seg) & (s > 0)
        return prev, keep
    shard_of, half_of = (jnp.asarray(a) for a in _chunk_table(shards, True))
    gathered = jax.tree.map(lambda x: jax.lax.all_gather(x, SEQ), (tails, last_seg))  # [S, nh, ...]
    chunks = _chunk_ids(s, shards, True)
    prev_chunk = jnp.maximum(chunks - 1, 0)
    ps, ph = shard_of[prev_chunk], half_of[prev_chunk]
    prev, prev_last = jax.tree.map(lambda x: x[ps, ph], gathered)
    keep = (prev_last == first_seg) & (chunks > 0)[:, None]
    return prev, keep


def _vary_like(x, ref):
    """x marked as varying over the manual mesh axes that `ref` varies over (shard_map's type
    check wants scan carries built from constants to match the carries they become)."""
    want = tuple(sorted(_varying(ref) - _varying(x)))
    return jax.lax.pcast(x, want, to="varying") if want else x


def _varying(x) -> set:
    """Manual mesh axes x varies over (`aval.vma` in newer jax, `manual_axis_type.varying` in 0.10)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
    return set(vma)


def _split(x, nh: int):
    """[b, nh * c, ...] -> [nh, b, c, ...]."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, nh, t // nh, *x.shape[2:]), 1, 0)


def _merge(x):
    """[nh, b, c, ...] -> [b, nh * c, ...]."""
    nh, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, nh * c, *x.shape[3:])


def _fold_states(a, f, keep, initial, apply: Callable, zigzag: bool):
    """Exclusive prefix of the per-chunk affine maps S -> apply(a, keep * S) + f across shards.

    a, f, keep: this shard's [nh, ...] summaries. Returns (incoming state of each local half [nh, ...],
    the final state after the last global chunk)."""
    shards = jax.lax.axis_size(SEQ)
    s = jax.lax.axis_index(SEQ)
    shard_of, half_of = _chunk_table(shards, zigzag)
    ga, gf, gk = (jax.lax.all_gather(x, SEQ) for x in (a, f, keep))  # [S, nh, ...]
    carry = initial
    prefix = []
    for j in range(len(shard_of)):  # static: <= 2 * 64 small ops
        sj, hj = int(shard_of[j]), int(half_of[j])
        prefix.append(carry)
        kj = gk[sj, hj].reshape(gk.shape[2:] + (1,) * (carry.ndim - gk.ndim + 2))
        incoming = jnp.where(kj, carry, 0.0) if j else carry
        carry = apply(ga[sj, hj], incoming) + gf[sj, hj]
    prefix = jnp.stack(prefix)
    mine = prefix[_chunk_ids(s, shards, zigzag)]
    kmine = keep.reshape(keep.shape + (1,) * (mine.ndim - keep.ndim))
    first = (_chunk_ids(s, shards, zigzag) == 0).reshape((-1,) + (1,) * (mine.ndim - 1))
    return jnp.where(first | kmine, mine, 0.0), carry


# --------------------------------------------------------------------------------------------
# Attention (GQA and MLA).


def _attend(q, payload, seg, decompress, scale: float, mode: str, zigzag: bool, kernel: str):
    """Inside shard_map: local queries q [b, tl, h, d] against every shard's keys, one block at a time.

    payload: pytree of [b, tl, ...] arrays; decompress(payload) -> (k [b, tl, g, d], v [b, tl, g, dv]).
    kernel: "xla" (online softmax over query tiles in XLA) or "pallas" / "interpret" (the flash block
    kernel, blocks merged by their log-sum-exp)."""
    shards = jax.lax.axis_size(SEQ)
    s = jax.lax.axis_index(SEQ)
    q_idx = _token_index(s, q.shape[1], shards, zigzag)
    k0, v0 = decompress(payload)  # shapes only (dead code after tracing)
    merge = (_tiled_softmax(q, seg, q_idx, scale, k0.shape[2], v0.shape[-1]) if kernel == "xla" else
             _flash_merge(q, seg, q_idx, scale, v0.shape[-1], interpret=kernel == "interpret"))

    def block(acc, kv, kseg, j):
        # decompress outside the cond: its weight gradients are psum'd over the shards, which must all
        # take part (a collective inside a branch that only some shards take deadlocks)
        k, v = decompress(kv)
        k_idx = _token_index(j, q.shape[1], shards, zigzag)
        visible = jnp.min(k_idx) <= jnp.max(q_idx)
        return jax.lax.cond(visible, lambda a: merge.update(a, k, v, kseg, k_idx), lambda a: a, acc)

    acc = jax.tree.map(lambda a: _vary_like(a, q), merge.init)
    if mode == "allgather":
        full = jax.tree.map(lambda x: jax.lax.all_gather(x, SEQ), (payload, seg))  # [S, b, tl, ...]

        def step(acc, j):
            kv, kseg = jax.tree.map(lambda x: x[j], full)
            return block(acc, kv, kseg, j), None

        acc, _ = jax.lax.scan(step, acc, jnp.arange(shards))
    else:  # ring: step i holds shard (s - i) mod S's block; the next one is already in flight
        perm = [(i, (i + 1) % shards) for i in range(shards)]

        def step(carry, i):
            acc, cur = carry
            nxt = jax.tree.map(lambda x: jax.lax.ppermute(x, SEQ, perm), cur)
            acc = block(acc, cur[0], cur[1], (s - i) % shards)
            return (acc, nxt), None

        (acc, last), _ = jax.lax.scan(step, (acc, (payload, seg)), jnp.arange(shards - 1))
        acc = block(acc, last[0], last[1], (s - (shards - 1)) % shards)
    return merge.finish(acc).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class _Merge:
    """How key blocks update the attention of the local queries: accumulator, update, final output."""

    init: tuple
    update: Callable  # (acc, k, v, k_segments, k_positions) -> acc
    finish: Callable  # acc -> o [b, tl, h, dv]


def _flash_merge(q, seg, q_idx, scale: float, dv: int, interpret: bool) -> _Merge:
    """Flash block kernel per key block, (lse, o) merged by `flash_block.merge`."""
    b, tl, h, _ = q.shape

    def update(acc, k, v, kseg, k_idx):
        o_j, lse_j = flash_block.flash_block(q, k.astype(q.dtype), v.astype(q.dtype), q_idx, k_idx, seg, kseg,
                                             scale=scale, interpret=interpret)
        return flash_block.merge(*acc, lse_j, o_j)

    return _Merge((jnp.full((b, h, tl), _NEG, _F32), jnp.zeros((b, tl, h, dv), _F32)), update, lambda a: a[1])


def _tiled_softmax(q, seg, q_idx, scale: float, g: int, dv: int) -> _Merge:
    """Online softmax in XLA over query tiles of `_query_tile` rows, each rematerialised in the backward
    pass, so no [tl, tl] scores ever exist whole (but each tile's fp32 scores go through HBM)."""
    b, tl, h, d = q.shape
    rows = _query_tile(tl, b * h * tl * 4)  # one query row's fp32 scores against the block: b h tl 4 bytes
    n = tl // rows

    def update(acc, k, v, kseg, k_idx):
        def tile(args):
            (m, denom, o), q_t, q_idx_t, seg_t = args
            qg = q_t.reshape(b, rows, g, h // g, d)
            scores = jnp.einsum("bqgrd,bkgd->bgrqk", qg, k.astype(q.dtype),
                                preferred_element_type=_F32) * scale
            mask = (k_idx[None, :] <= q_idx_t[:, None])[None] & (seg_t[:, :, None] == kseg[:, None, :])
            mask = mask[:, None, None]
            scores = jnp.where(mask, scores, _NEG)  # finite, so exp never overflows (nor its gradient)
            m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
            p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            o = o * corr[..., None] + jnp.einsum("bgrqk,bkgv->bgrqv", p.astype(v.dtype), v,
                                                 preferred_element_type=_F32)
            return m_new, denom * corr + p.sum(-1), o

        def to_tiles(x, axis):  # [..., tl, ...] -> [n, ..., rows, ...]
            return jnp.moveaxis(x.reshape(*x.shape[:axis], n, rows, *x.shape[axis + 1:]), axis, 0)

        def from_tiles(x, axis):
            x = jnp.moveaxis(x, 0, axis)
            return x.reshape(*x.shape[:axis], tl, *x.shape[axis + 2:])

        tiles = (tuple(to_tiles(a, 3) for a in acc), to_tiles(q, 1), q_idx.reshape(n, rows), to_tiles(seg, 1))
        return tuple(from_tiles(a, 3) for a in jax.lax.map(jax.checkpoint(tile), tiles))

    def finish(acc):
        _, denom, o = acc
        return (o / denom[..., None]).transpose(0, 3, 1, 2, 4).reshape(b, tl, h, dv)

    init = (jnp.full((b, g, h // g, tl), _NEG, _F32), jnp.zeros((b, g, h // g, tl), _F32),
            jnp.zeros((b, g, h // g, tl, dv), _F32))
    return _Merge(init, update, finish)


def _checks_vma(kernel: str) -> bool:
    """shard_map's varying-axes check, off around Pallas calls (as in `pallas_common.on_mesh`: the
    interpreter fails its own check inside shard_map)."""
    return kernel == "xla"


def _kernel_for(t_local: int, d: int, dv: int) -> str:
    """The block attention of this run: "pallas" on GPU (where the flash block kernel takes the shapes),
    "interpret" when the settings ask for Pallas elsewhere (tests), else "xla"."""
    choice = current().attention
    reason = flash_block.unsupported(t_local, t_local, d, dv)
    on_gpu = jax.default_backend() == "gpu"
    if choice == "xla" or (choice == "auto" and not on_gpu):
        return "xla"
    if reason:
        if choice == "pallas":
            raise ValueError(f"context-parallel attention='pallas': {reason}")
        log.info("context-parallel attention: flash block kernel not taken (%s); using XLA", reason)
        return "xla"
    return "pallas" if on_gpu else "interpret"


SCORE_TILE_BYTES = 1 << 30  # fp32 scores of one (query tile x key block) step of context-parallel attention


def _query_tile(t_local: int, score_bytes_per_row: int) -> int:
    """Rows per query tile: t_local halved (while even) until a tile's scores fit SCORE_TILE_BYTES."""
    rows = t_local
    while rows % 2 == 0 and rows * score_bytes_per_row > SCORE_TILE_BYTES:
        rows //= 2
    return rows


def attention(q, k, v, *, segment_ids=None, scale: float | None = None):
    """Context-parallel causal GQA attention (K/V travel): same result as `kernels.attention`."""
    mesh = active_mesh()
    cfg = current()
    b, t, h, d = q.shape
    _check_length(mesh, t, cfg.load_balance)
    scale = d ** -0.5 if scale is None else scale
    bs, ts = batch_axes(mesh, b), heads_axis(mesh, h, k.shape[2])
    heads = P(bs, SEQ, ts, None)
    kernel = _kernel_for(t // mesh.shape[SEQ], d, v.shape[-1])

    def local(q, k, v, seg):
        return _attend(q, (k, v), seg, lambda kv: kv, scale, cfg.mode, cfg.load_balance, kernel)

    return _shard_map(local, mesh, (heads, heads, heads, P(bs, SEQ)), heads, _checks_vma(kernel))(
        q, k, v, _segments(segment_ids, b, t))


def mla_attention(q, latent, w_uk, w_uv, *, kv_lora_rank: int, segment_ids=None, scale: float):
    """Context-parallel MLA: only the latents [b, t, r + dr] travel; k = [c W_UK ; k_rope],
    v = c W_UV are rebuilt per block on the receiving shard. q [b, t, h, dn + dr]."""
    mesh = active_mesh()
    cfg = current()
    b, t, h, _ = q.shape
    _check_length(mesh, t, cfg.load_balance)
    bs, ts = batch_axes(mesh, b), heads_axis(mesh, h, w_uk.shape[1])
    r = kv_lora_rank
    kernel = _kernel_for(t // mesh.shape[SEQ], q.shape[-1], w_uv.shape[-1])

    def local(q, latent, seg, w_uk, w_uv):
        def decompress(lat):
            c, k_rope = lat[..., :r], lat[..., r:]
            k_nope = jnp.einsum("btr,rgn->btgn", c, w_uk)
            v = jnp.einsum("btr,rgv->btgv", c, w_uv)
            k_rope = jnp.broadcast_to(k_rope[:, :, None, :], (*k_nope.shape[:3], k_rope.shape[-1]))
            return jnp.concatenate([k_nope, k_rope.astype(k_nope.dtype)], -1), v

        return _attend(q, latent, seg, decompress, scale, cfg.mode, cfg.load_balance, kernel)

    heads = P(bs, SEQ, ts, None)
    return _shard_map(local, mesh, (heads, P(bs, SEQ, None), P(bs, SEQ), P(None, ts, None),
                                    P(None, ts, None)), heads, _checks_vma(kernel))(
        q, latent, _segments(segment_ids, b, t), w_uk, w_uv)


# --------------------------------------------------------------------------------------------
# Linear mixers.


def ssd(x, dt, A, B, C, *, D=None, dt_bias=None, dt_limit=(0.0, float("inf")), initial_state=None,
        segment_ids=None, chunk_size: int = 64, impl: str = "chunked"):
    """Context-parallel `kernels.ssd.ssd` (dt_softplus=True): returns (y, final state)."""
    mesh = active_mesh()
    zigzag = current().load_balance
    b, t, h, p = x.shape
    n = B.shape[-1]
    _check_length(mesh, t, zigzag)
    bs, ts = batch_axes(mesh, b), heads_axis(mesh, h, B.shape[2], C.shape[2])
    nh = _halves(zigzag)
    D = jnp.zeros((h,), _F32) if D is None else D
    dt_bias = jnp.zeros((h,), _F32) if dt_bias is None else dt_bias
    h0 = jnp.zeros((b, h, p, n), _F32) if initial_state is None else initial_state.astype(_F32)

    def local(x, dt, A, B, C, D, dt_bias, seg, h0):
        hl = x.shape[2]
        xs, dts, Bs, Cs, segs = (_split(a, nh) for a in (x, dt, B, C, seg))
        fold = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731  [nh, b, ...] -> [nh b, ...]
        kw = dict(dt_bias=dt_bias, dt_limit=dt_limit, segment_ids=fold(segs), chunk_size=chunk_size, impl=impl)
        y0, fin = _ssd_kernel(fold(xs), fold(dts), A, fold(Bs), fold(Cs), D=D, **kw)
        # per-token cumulative decay (zero from a reset on) and the chunk's total decay
        e0 = jnp.zeros_like(fold(Cs)).at[..., 0].set(1.0)
        ones = _vary_like(jnp.ones((fin.shape[0], hl, 1, n), _F32), x)
        cum, dec = _ssd_kernel(jnp.zeros((*fold(xs).shape[:3], 1), x.dtype), fold(dts), A,
                               jnp.zeros_like(fold(Bs)), e0, initial_state=ones, **kw)
        unfold = lambda a: a.reshape(nh, -1, *a.shape[1:])  # noqa: E731
        fin, dec, y0, cum = unfold(fin), unfold(dec[..., 0, 0]), unfold(y0), unfold(cum[..., 0])
        _, keep = _prev_tails(None, segs[:, :, 0], segs[:, :, -1], zigzag)
        s_in, final = _fold_states(dec, fin, keep, h0, lambda a, st: a[..., None, None] * st, zigzag)
        c_heads = jnp.repeat(Cs.astype(_F32), hl // Cs.shape[3], axis=3)  # [nh, b, c, h, n]
        y = y0.astype(_F32) + cum[..., None] * jnp.einsum("ebhpn,ebthn->ebthp", s_in, c_heads)
        return _merge(y).astype(x.dtype), final[None]

    heads = P(bs, SEQ, ts, None)
    vec = P(ts)
    y, final = _shard_map(local, mesh, (heads, P(bs, SEQ, ts), vec, heads, heads, vec, vec, P(bs, SEQ),
                                        P(bs, ts, None, None)), (heads, P(SEQ, bs, ts, None, None)))(
        x, dt, A, B, C, D, dt_bias, _segments(segment_ids, b, t), h0)
    return y, final[-1]


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, segment_ids=None,
                     use_qk_l2norm: bool = False, chunk_size: int = 64, impl: str = "chunked"):
    """Context-parallel `kernels.gated_delta.gated_delta_rule`: returns (o, final state)."""
    mesh = active_mesh()
    zigzag = current().load_balance
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    _check_length(mesh, t, zigzag)
    bs, ts = batch_axes(mesh, b), heads_axis(mesh, h)
    nh = _halves(zigzag)
    h0 = jnp.zeros((b, h, dk, dv), _F32) if initial_state is None else initial_state.astype(_F32)

    def local(q, k, v, g, beta, seg, h0):
        hl = q.shape[2]
        qs, ks, vs, gs, bes, segs = (_split(a, nh) for a in (q, k, v, g, beta, seg))
        fold = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
        unfold = lambda a: a.reshape(nh, -1, *a.shape[1:])  # noqa: E731
        kw = dict(scale=scale, segment_ids=fold(segs), use_qk_l2norm=use_qk_l2norm, chunk_size=chunk_size,
                  impl=impl)
        v_aug = jnp.concatenate([fold(vs), jnp.zeros((*fold(vs).shape[:3], dk), v.dtype)], -1)
        eye = jnp.broadcast_to(jnp.eye(dk, dtype=_F32), (v_aug.shape[0], hl, dk, dk))
        init = _vary_like(jnp.concatenate([jnp.zeros((v_aug.shape[0], hl, dk, dv), _F32), eye], -1), q)
        _, fin = _gdn_kernel(fold(qs), fold(ks), v_aug, fold(gs), fold(bes), initial_state=init, **kw)
        fin = unfold(fin)
        f, m = fin[..., :dv], fin[..., dv:]  # S_out = M S_in + F
        _, keep = _prev_tails(None, segs[:, :, 0], segs[:, :, -1], zigzag)
        s_in, final = _fold_states(m, f, keep, h0, lambda a, st: jnp.einsum("...ij,...jv->...iv", a, st),
                                   zigzag)
        o, _ = _gdn_kernel(fold(qs), fold(ks), fold(vs), fold(gs), fold(bes), initial_state=fold(s_in), **kw)
        return _merge(unfold(o)), final[None]

    heads = P(bs, SEQ, ts, None)
    state = P(bs, ts, None, None)
    o, final = _shard_map(local, mesh, (heads, heads, heads, P(bs, SEQ, ts), P(bs, SEQ, ts), P(bs, SEQ), state),
                          (heads, P(SEQ, bs, ts, None, None)))(q, k, v, g, beta, _segments(segment_ids, b, t), h0)
    return o, final[-1]


def causal_conv1d(conv: Callable, u, prefix, kernel, bias, segment_ids=None):
    """Context-parallel depthwise causal conv. `conv(u, prefix, kernel, bias, segment_ids) -> (y,
    new_prefix)` is the single-device function; `prefix` [b, K-1, c] feeds the first shard.
    Returns y (fp32) only: callers that need the next prefix take it from the global array."""
    mesh = active_mesh()
    zigzag = current().load_balance
    b, t, c = u.shape
    _check_length(mesh, t, zigzag)
    bs, ts = batch_axes(mesh, b), heads_axis(mesh, c)
    nh = _halves(zigzag)
    km1 = prefix.shape[1]
    has_bias = bias is not None
    bias = jnp.zeros((c,), kernel.dtype) if bias is None else bias

    def local(u, prefix, kernel, bias, seg):
        us, segs = _split(u, nh), _split(seg, nh)
        if us.shape[2] < km1:
            raise MeshError(f"conv kernel {km1 + 1} is wider than a sequence shard's {us.shape[2]} tokens")
        tails = us[:, :, -km1:]
        prev, keep = _prev_tails(tails, segs[:, :, 0], segs[:, :, -1], zigzag)
        s = jax.lax.axis_index(SEQ)
        chunk0 = (_chunk_ids(s, jax.lax.axis_size(SEQ), zigzag) == 0)[:, None, None, None]
        pre = jnp.where(chunk0, prefix.astype(u.dtype)[None], jnp.where(keep[..., None, None], prev, 0))
        fold = lambda a: a.reshape(-1, *a.shape[2:])  # noqa: E731
        y, _ = conv(fold(us), fold(pre), kernel, bias if has_bias else None, fold(segs))
        return _merge(y.reshape(nh, -1, *y.shape[1:]))

    return _shard_map(local, mesh, (P(bs, SEQ, ts), P(bs, None, ts), P(None, ts), P(ts), P(bs, SEQ)),
                      P(bs, SEQ, ts))(u, prefix, kernel, bias, _segments(segment_ids, b, t))

