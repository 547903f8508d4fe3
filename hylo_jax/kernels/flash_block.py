"""Flash attention of one block of queries against one block of keys, returning the output AND its
log-sum-exp, differentiable in both (Pallas, GPU Triton backend; interpret mode on CPU).

This is the building block of context-parallel attention: a shard's queries meet every shard's keys
one block at a time and the partial results are merged by their log-sum-exp,
    lse = logaddexp(lse_1, lse_2),  o = e^{lse_1 - lse} o_1 + e^{lse_2 - lse} o_2,
so the merge is plain differentiable JAX and the kernel's VJP takes a cotangent for lse as well as o.

Masks use *global* token positions (any int32 vectors, e.g. the zig-zag layout's, shared by the rows or
per row) and segment ids:
query i sees key j iff pos_k[j] <= pos_q[i] and seg_k[j] == seg_q[i]. With s = scale q k^T,
    lse_i = log sum_j e^{s_ij} (over visible j),  P = e^{s - lse},  o = P v.
Backward, for cotangents (do, dlse) and D_i = rowsum(do * o)_i - dlse_i:
    dP = do v^T,  dS = P * (dP - D),  dq = scale dS k,  dk = scale dS^T q,  dv = P^T do.
Kernels: forward (program per (row, head, query block), online softmax over key blocks), dq (same grid),
dk/dv (program per (row, kv head, key block), looping over the heads of its group and the query
blocks). Key or query blocks that the causal order makes invisible as a whole are skipped (`cond`);
rows with no visible key get o = 0 and lse = NEG. Head dims that are not a power of two (MLA's 192)
are split into power-of-two parts (128 + 64), each its own dot.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from .pallas_common import is_pow2, masked_exp, mm, with_vma

F32 = jnp.float32
NEG = -1e30  # log-sum-exp of a row that sees no key (finite: merges and gradients stay finite)
_MIN_DIM = 16  # Triton's smallest dot operand (and smallest block)


@dataclasses.dataclass(frozen=True)
class Tile:
    """One kernel's launch shape: query and key rows per step, Triton warps and pipeline stages."""

    q: int = 64
    k: int = 64
    warps: int = 4
    stages: int = 2

    def fit(self, q_len: int, k_len: int) -> Tile:
        return dataclasses.replace(self, q=block_rows(q_len, self.q), k=block_rows(k_len, self.k))


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tiles of the forward, dq and dk/dv kernels (`benchmarks/block_attention.py --sweep` times choices)."""

    forward: Tile = Tile()
    dq: Tile = Tile()
    dkv: Tile = Tile()

    def fit(self, q_len: int, k_len: int) -> Tiling:
        return Tiling(*(t.fit(q_len, k_len) for t in (self.forward, self.dq, self.dkv)))


def default_tiling(d: int) -> Tiling:
    """Measured on an H100 (`block_attention.py --sweep`, 32K x 32K causal blocks): forward 128 query x 64 key
    rows, 4 warps (MLA fwd 74 -> 55 ms against 64 x 64); backward 128 x 64 with 8 warps for MLA's d = 192
    (240 -> 167 ms) and 4 for d = 64 (77 -> 68 ms)."""
    backward = Tile(128, 64, 8 if d > 128 else 4, 2)
    return Tiling(Tile(128, 64, 4, 2), backward, backward)


def dim_parts(d: int) -> tuple[tuple[int, int], ...]:
    """(offset, width) power-of-two pieces of a head dim, largest first: 192 -> (0, 128), (128, 64)."""
    parts, off = [], 0
    for bit in reversed(range(d.bit_length())):
        w = 1 << bit
        if d & w:
            parts.append((off, w))
            off += w
    return tuple(parts)


def block_rows(length: int, most: int = 64) -> int:
    """Rows per block: the largest power of two <= `most` dividing `length` (0 if below _MIN_DIM)."""
    rows = most
    while rows >= _MIN_DIM and length % rows:
        rows //= 2
    return rows if rows >= _MIN_DIM else 0


def unsupported(q_len: int, k_len: int, d: int, dv: int) -> str | None:
    """Why the kernel cannot take these shapes (None if it can)."""
    if any(w < _MIN_DIM for _, w in dim_parts(d)):
        return f"head dim {d} has a power-of-two part below {_MIN_DIM}"
    if not is_pow2(dv) or dv < _MIN_DIM:
        return f"value head dim {dv} is not a power of two >= {_MIN_DIM}"
    if not (block_rows(q_len) and block_rows(k_len)):
        return f"lengths ({q_len} queries, {k_len} keys) are not multiples of {_MIN_DIM}"
    return None


def flash_block(
    q: Float[Array, "b tq h d"],
    k: Float[Array, "b tk g d"],
    v: Float[Array, "b tk g dv"],
    q_positions: Int[Array, "tq"] | Int[Array, "b tq"],
    k_positions: Int[Array, "tk"] | Int[Array, "b tk"],
    q_segments: Int[Array, "b tq"],
    k_segments: Int[Array, "b tk"],
    *,
    scale: float,
    interpret: bool = False,
    tiling: Tiling | None = None,
) -> tuple[Float[Array, "b tq h dv"], Float[Array, "b h tq"]]:
    """(o, lse) of causal, segment-masked attention of q against this key block; o and lse in fp32."""
    b, tq, h, d = q.shape
    tk, g, dv = k.shape[1], k.shape[2], v.shape[-1]
    if k.shape != (b, tk, g, d) or v.shape[:3] != (b, tk, g) or h % g:
        raise ValueError(f"flash_block shapes do not match: q {q.shape}, k {k.shape}, v {v.shape}")
    reason = unsupported(tq, tk, d, dv)
    if reason:
        raise ValueError(f"flash_block: {reason}")
    tiles = (tiling or default_tiling(d)).fit(tq, tk)
    ints = [jnp.broadcast_to(x, (b, n)).astype(jnp.int32) for x, n in
            ((q_positions, tq), (k_positions, tk), (q_segments, tq), (k_segments, tk))]
    return _attend(q, k, v, *ints, scale, tiles, interpret)


def merge(
    lse: Float[Array, "b h t"], o: Float[Array, "b t h dv"],
    lse_j: Float[Array, "b h t"], o_j: Float[Array, "b t h dv"],
) -> tuple[Float[Array, "b h t"], Float[Array, "b t h dv"]]:
    """Attention over two key sets from each one's (lse, o): lse' = logaddexp(lse, lse_j),
    o' = e^{lse - lse'} o + e^{lse_j - lse'} o_j (plain JAX, so autodiff handles it)."""
    new = jnp.logaddexp(lse, lse_j)
    weight = lambda x: jnp.exp(x - new).transpose(0, 2, 1)[..., None]  # noqa: E731  [b, t, h, 1]
    return new, weight(lse) * o + weight(lse_j) * o_j


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attend(q, k, v, qpos, kpos, qseg, kseg, scale, tiles, interpret):
    return _forward(q, k, v, qpos, kpos, qseg, kseg, scale, tiles.forward, interpret)


def _attend_fwd(q, k, v, qpos, kpos, qseg, kseg, scale, tiles, interpret):
    o, lse = _forward(q, k, v, qpos, kpos, qseg, kseg, scale, tiles.forward, interpret)
    return (o, lse), (q, k, v, qpos, kpos, qseg, kseg, o, lse)


def _attend_bwd(scale, tiles, interpret, res, cotangents):
    q, k, v, qpos, kpos, qseg, kseg, o, lse = res
    do, dlse = cotangents
    delta = jnp.einsum("bthv,bthv->bht", do.astype(F32), o) - dlse
    do = do.astype(q.dtype)
    args = (q, k, v, do, lse, delta, qpos, kpos, qseg, kseg)
    dq = _backward_q(*args, scale=scale, tile=tiles.dq, interpret=interpret)
    dk, dv = _backward_kv(*args, scale=scale, tile=tiles.dkv, interpret=interpret)
    return dq, dk, dv, None, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


# ----------------------------------------------------------------------------- kernels
def _params(interpret: bool, tile: Tile):
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=tile.warps, num_stages=tile.stages)


def _out_shapes(args, *shapes):
    """Output shapes (varying over the shard_map axes of the inputs, when called inside one)."""
    out = {i: jax.ShapeDtypeStruct(shape, dtype) for i, (shape, dtype) in enumerate(shapes)}
    return list(with_vma(out, dict(enumerate(args))).values())


def _scores(q_parts, k_ref, bi, cols, gi, parts, scale):
    """scale q k^T for one key block, summed over the head dim's power-of-two parts."""
    s = None
    for qp, (off, w) in zip(q_parts, parts):
        term = mm(qp, k_ref[bi, cols, gi, pl.ds(off, w)], tb=True)
        s = term if s is None else s + term
    return s * scale


def _load_parts(ref, bi, rows, hi, parts):
    return [ref[bi, rows, hi, pl.ds(off, w)] for off, w in parts]


def _visible(qpos, qseg, kpos, kseg):
    return (kpos[None, :] <= qpos[:, None]) & (kseg[None, :] == qseg[:, None])


@functools.partial(jax.jit, static_argnums=(7, 8, 9))
def _forward(q, k, v, qpos, kpos, qseg, kseg, scale, tile, interpret):
    b, tq, h, d = q.shape
    tk, g, dv = k.shape[1], k.shape[2], v.shape[-1]
    bq, bk = tile.q, tile.k
    parts, group = dim_parts(d), h // g

    def kernel(q_ref, k_ref, v_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, o_ref, lse_ref):
        bi, hi, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        gi = hi // group
        rows = pl.ds(qb * bq, bq)
        q_parts = _load_parts(q_ref, bi, rows, hi, parts)
        qpos, qseg = qpos_ref[bi, rows], qseg_ref[bi, rows]
        last_query = jnp.max(qpos)

        def body(j, carry):
            cols = pl.ds(j * bk, bk)
            kpos = kpos_ref[bi, cols]

            def update(carry):
                m, l, acc = carry
                s = _scores(q_parts, k_ref, bi, cols, gi, parts, scale)
                ok = _visible(qpos, qseg, kpos, kseg_ref[bi, cols])
                m_new = jnp.maximum(m, jnp.max(jnp.where(ok, s, NEG), axis=1))
                p = masked_exp(s - m_new[:, None], ok)
                correction = jnp.exp(m - m_new)
                val = v_ref[bi, cols, gi, :]
                acc = acc * correction[:, None] + mm(p.astype(val.dtype), val)
                return m_new, l * correction + jnp.sum(p, axis=1), acc

            return lax.cond(jnp.min(kpos) <= last_query, update, lambda c: c, carry)

        init = (jnp.full((bq,), NEG, F32), jnp.zeros((bq,), F32), jnp.zeros((bq, dv), F32))
        m, l, acc = lax.fori_loop(0, tk // bk, body, init)
        seen = l > 0
        o_ref[bi, rows, hi, :] = acc / jnp.where(seen, l, 1.0)[:, None]
        lse_ref[bi, hi, rows] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), NEG)

    args = (q, k, v, qpos, kpos, qseg, kseg)
    return pl.pallas_call(
        kernel, grid=(b, h, tq // bq), interpret=interpret, compiler_params=_params(interpret, tile),
        out_shape=_out_shapes(args, ((b, tq, h, dv), F32), ((b, h, tq), F32)),
    )(*args)


def _probabilities(q_parts, k_ref, bi, cols, gi, parts, scale, lse, ok):
    return masked_exp(_scores(q_parts, k_ref, bi, cols, gi, parts, scale) - lse[:, None], ok)


@functools.partial(jax.jit, static_argnames=("scale", "tile", "interpret"))
def _backward_q(q, k, v, do, lse, delta, qpos, kpos, qseg, kseg, *, scale, tile, interpret):
    b, tq, h, d = q.shape
    tk, g = k.shape[1], k.shape[2]
    bq, bk = tile.q, tile.k
    parts, group = dim_parts(d), h // g

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref, dq_ref):
        bi, hi, qb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        gi = hi // group
        rows = pl.ds(qb * bq, bq)
        q_parts = _load_parts(q_ref, bi, rows, hi, parts)
        qpos, qseg = qpos_ref[bi, rows], qseg_ref[bi, rows]
        d_out, lse, delta = do_ref[bi, rows, hi, :], lse_ref[bi, hi, rows], delta_ref[bi, hi, rows]
        last_query = jnp.max(qpos)

        def body(j, dq):
            cols = pl.ds(j * bk, bk)
            kpos = kpos_ref[bi, cols]

            def update(dq):
                ok = _visible(qpos, qseg, kpos, kseg_ref[bi, cols])
                p = _probabilities(q_parts, k_ref, bi, cols, gi, parts, scale, lse, ok)
                ds = p * (mm(d_out, v_ref[bi, cols, gi, :], tb=True) - delta[:, None]) * scale
                ds = ds.astype(q_ref.dtype)
                return [acc + mm(ds, k_ref[bi, cols, gi, pl.ds(off, w)]) for acc, (off, w) in zip(dq, parts)]

            return lax.cond(jnp.min(kpos) <= last_query, update, lambda c: c, dq)

        dq = lax.fori_loop(0, tk // bk, body, [jnp.zeros((bq, w), F32) for _, w in parts])
        for acc, (off, w) in zip(dq, parts):
            dq_ref[bi, rows, hi, pl.ds(off, w)] = acc.astype(dq_ref.dtype)

    args = (q, k, v, do, lse, delta, qpos, kpos, qseg, kseg)
    return pl.pallas_call(
        kernel, grid=(b, h, tq // bq), interpret=interpret, compiler_params=_params(interpret, tile),
        out_shape=_out_shapes(args, (q.shape, q.dtype))[0],
    )(*args)


@functools.partial(jax.jit, static_argnames=("scale", "tile", "interpret"))
def _backward_kv(q, k, v, do, lse, delta, qpos, kpos, qseg, kseg, *, scale, tile, interpret):
    b, tq, h, d = q.shape
    tk, g, dv = k.shape[1], k.shape[2], v.shape[-1]
    bq, bk = tile.q, tile.k
    parts, group = dim_parts(d), h // g

    def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kpos_ref, qseg_ref, kseg_ref,
               dk_ref, dv_ref):
        bi, gi, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        cols = pl.ds(kb * bk, bk)
        kpos, kseg = kpos_ref[bi, cols], kseg_ref[bi, cols]
        val = v_ref[bi, cols, gi, :]
        first_key = jnp.min(kpos)

        def head(r, carry):
            hi = gi * group + r

            def body(i, carry):
                rows = pl.ds(i * bq, bq)
                qpos = qpos_ref[bi, rows]

                def update(carry):
                    dk, dval = carry
                    q_parts = _load_parts(q_ref, bi, rows, hi, parts)
                    ok = _visible(qpos, qseg_ref[bi, rows], kpos, kseg)
                    p = _probabilities(q_parts, k_ref, bi, cols, gi, parts, scale, lse_ref[bi, hi, rows], ok)
                    d_out = do_ref[bi, rows, hi, :]
                    dval = dval + mm(p.astype(d_out.dtype), d_out, ta=True)
                    ds = p * (mm(d_out, val, tb=True) - delta_ref[bi, hi, rows][:, None]) * scale
                    ds = ds.astype(q_ref.dtype)
                    return [a + mm(ds, qp, ta=True) for a, qp in zip(dk, q_parts)], dval

                return lax.cond(jnp.max(qpos) >= first_key, update, lambda c: c, carry)

            return lax.fori_loop(0, tq // bq, body, carry)

        init = ([jnp.zeros((bk, w), F32) for _, w in parts], jnp.zeros((bk, dv), F32))
        dk, dval = lax.fori_loop(0, group, head, init)
        for acc, (off, w) in zip(dk, parts):
            dk_ref[bi, cols, gi, pl.ds(off, w)] = acc.astype(dk_ref.dtype)
        dv_ref[bi, cols, gi, :] = dval.astype(dv_ref.dtype)

    args = (q, k, v, do, lse, delta, qpos, kpos, qseg, kseg)
    return pl.pallas_call(
        kernel, grid=(b, g, tk // bk), interpret=interpret, compiler_params=_params(interpret, tile),
        out_shape=_out_shapes(args, (k.shape, k.dtype), (v.shape, v.dtype)),
    )(*args)
