"""Pallas kernels for the chunked gated delta rule, forward and backward (`jax.custom_vjp`).

Per (batch*head, value block) program and chunk (positions i, j; G the chunk-local cumulative log-decay;
the masks and decay factors of `pallas_common.decays` zero every factor that crosses a segment reset):

    N     = beta_i (k_i . k_j) e^{G_i - G_j}  (i > j)       T = (I + N)^{-1}  (in-kernel forward substitution)
    u     = T (beta v)        w = T (beta e^{G} k)          delta = u - w S

T and w need no state: a first kernel computes them for all chunks in parallel (grid rows x chunks), so the
64-step substitution is off the sequential path; the scan kernels read them (stored in k's dtype).
    o     = (e^{G} q) S + ((q k^T) o E) delta               S' = e^{G_C} S + (e^{G_C - G} k)^T delta

The forward saves the state entering every chunk (fp32, the only thing that costs a sequential pass);
the backward walks the chunks in reverse carrying dS, reads T and w, and recomputes u, delta, k k^T per
chunk. Value blocks are independent in the forward; in the backward each writes partial dq, dk, dbeta, dG
that the wrapper sums.
Matmul operands are in the inputs' dtype (bf16 in training), accumulation and state in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from . import pallas_common as pc
from .pallas_common import F32, Arg, Plan, mm

_GATES = (Arg("gc", "col"), Arg("gr", "row"), Arg("bc", "col"), Arg("sc", "col"), Arg("sr", "row"))
_SEQ = (Arg("q", "seq"), Arg("k", "seq"), Arg("v", "seq", vblocked=True), *_GATES, Arg("t", "cmat"),
        Arg("w", "seq"))


@dataclasses.dataclass(frozen=True)
class Config:
    chunk: int
    vb: int
    backend: str  # "gpu" (Triton) | "tpu" (Mosaic TPU)
    interpret: Any = None  # None / False on device; True (generic) or pltpu.InterpretParams on CPU
    num_warps: int = 4


def _ut_transform(ins):
    """Per chunk, no state: T = (I + N)^{-1} and w = T (beta e^{G} k) (a parallel kernel over all chunks,
    off the sequential path). Both are stored in k's dtype, the dtype they enter the matmuls in."""
    k, bc = ins["k"], ins["bc"]
    dec = pc.decays(ins["gc"], ins["gr"], ins["sc"], ins["sr"])
    t = pc.unit_lower_inverse(bc * mm(k, k, tb=True) * dec.strict).astype(k.dtype)
    w = mm(t, (bc * dec.d_in * k.astype(F32)).astype(k.dtype))
    return {"t": t, "w": w}


def _prepare(ins, cdt):
    """Recomputed per chunk in forward and backward: decays, u = T (beta v), q k^T."""
    q, k, v, bc = ins["q"], ins["k"], ins["v"], ins["bc"]
    dec = pc.decays(ins["gc"], ins["gr"], ins["sc"], ins["sr"])
    t, w = ins["t"], ins["w"]
    u = mm(t, (bc * v.astype(F32)).astype(cdt))
    qk = mm(q, k, tb=True)
    return dec, t, u, w, qk


def _fwd_step(save_states: bool):
    def step(ins, s):
        q, k = ins["q"], ins["k"]
        cdt = k.dtype
        dec, _, u, w, qk = _prepare(ins, cdt)
        lo = lambda x: x.astype(cdt)  # noqa: E731
        delta = u - mm(lo(w), lo(s))
        o = mm(lo(dec.d_in * q.astype(F32)), lo(s)) + mm(lo(qk * dec.causal), lo(delta))
        s_new = dec.d_chunk * s + mm(lo(dec.d_out * k.astype(F32)), lo(delta), ta=True)
        outs = {"o": o}
        if save_states:
            outs["s0"] = s
        return outs, s_new

    return step


def _bwd_step(ins, ds):
    q, k, v, bc, s0, do = ins["q"], ins["k"], ins["v"], ins["bc"], ins["s0"], ins["do"]
    cdt = k.dtype
    lo = lambda x: x.astype(cdt)  # noqa: E731
    q32, k32 = q.astype(F32), k.astype(F32)
    dec, t, u, w, qk = _prepare(ins, cdt)
    kk = mm(k, k, tb=True)
    delta = u - mm(lo(w), lo(s0))
    p = qk * dec.causal
    ko = dec.d_out * k32
    d_delta = mm(lo(p), lo(do), ta=True) + mm(lo(ko), lo(ds))
    ds0 = mm(lo(dec.d_in * q32), lo(do), ta=True) + dec.d_chunk * ds - mm(lo(w), lo(d_delta), ta=True)
    dp = mm(lo(do), lo(delta), tb=True)
    dqk = dp * dec.causal
    do_s = mm(lo(do), lo(s0), tb=True)
    dko = mm(lo(delta), lo(ds), tb=True)
    dw = -mm(lo(d_delta), lo(s0), tb=True)
    dbv = mm(lo(t), lo(d_delta), ta=True)
    dbk = mm(lo(t), lo(dw), ta=True)
    dn = -jnp.where(dec.strict_mask, mm(lo(dbv), lo(u), tb=True) + mm(lo(dbk), lo(w), tb=True), 0.0)
    dkk = dn * bc * dec.strict
    dbk_k = jnp.sum(dbk * k32, axis=1, keepdims=True)
    dq = mm(lo(dqk), k) + dec.d_in * do_s
    dk = (mm(lo(dqk), q, ta=True) + dec.d_out * dko + mm(lo(dkk), k) + mm(lo(dkk), k, ta=True)
          + bc * dec.d_in * dbk)
    dbeta = (jnp.sum(dn * kk * dec.strict, axis=1, keepdims=True)
             + jnp.sum(dbv * v.astype(F32), axis=1, keepdims=True) + dec.d_in * dbk_k)
    dd_in = jnp.sum(do_s * q32, axis=1, keepdims=True) + bc * dbk_k
    dd_out = jnp.sum(dko * k32, axis=1, keepdims=True)
    dd_chunk = jnp.sum(jnp.sum(s0 * ds, axis=1, keepdims=True), axis=0, keepdims=True)
    z = dp * qk * dec.causal + dkk * kk
    dg = pc.decay_grads(dec, z, dd_in, dd_out, dd_chunk)
    return {"dq": dq, "dk": dk, "dv": bc * dbv, "dbeta": dbeta, "dg": dg}, ds0


def _gate_args(gcum, beta, seg):
    return dict(gc=pc.as_col(gcum), gr=pc.as_row(gcum), bc=pc.as_col(beta), sc=pc.as_col(seg),
                sr=pc.as_row(seg))


def _ut(cfg: Config, k, gcum, beta, seg):
    x, tp, dk = k.shape
    n, c = tp // cfg.chunk, cfg.chunk
    shapes = dict(t=jax.ShapeDtypeStruct((x, n, c, c), k.dtype), w=jax.ShapeDtypeStruct((x, tp, dk), k.dtype))
    r = pc.run_parallel(_ut_transform, (Arg("k", "seq"), *_GATES), (Arg("t", "cmat"), Arg("w", "seq")),
                        dict(k=k, **_gate_args(gcum, beta, seg)), shapes, n, c, cfg.backend, cfg.interpret,
                        num_warps=cfg.num_warps)
    return r["t"], r["w"]


def _forward(cfg: Config, q, k, v, gcum, beta, seg, h0, save_states: bool):
    x, tp, dk = q.shape
    dv = v.shape[-1]
    n, c = tp // cfg.chunk, cfg.chunk
    t, w = _ut(cfg, k, gcum, beta, seg)
    outs = (Arg("o", "seq", vblocked=True), Arg("hT", "state", vblocked=True))
    if save_states:
        outs += (Arg("s0", "cstate", vblocked=True),)
    plan = Plan(_fwd_step(save_states), _SEQ + (Arg("h0", "state", vblocked=True),), outs, "h0", "hT",
                n, c, cfg.vb, dv // cfg.vb)
    args = dict(q=q, k=k, v=v, **_gate_args(gcum, beta, seg), t=t, w=w, h0=h0)
    shapes = dict(o=jax.ShapeDtypeStruct((x, tp, dv), v.dtype), hT=jax.ShapeDtypeStruct((x, dk, dv), F32),
                  s0=jax.ShapeDtypeStruct((x, n, dk, dv), F32))
    r = pc.run(plan, args, shapes, cfg.backend, cfg.interpret, num_warps=cfg.num_warps)
    return r["o"], r["hT"], (r["s0"], t, w) if save_states else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(cfg: Config, q, k, v, gcum, beta, seg, h0):
    o, ht, _ = _forward(cfg, q, k, v, gcum, beta, seg, h0, save_states=False)
    return o, ht


def _core_fwd(cfg, q, k, v, gcum, beta, seg, h0):
    o, ht, (states, t, w) = _forward(cfg, q, k, v, gcum, beta, seg, h0, save_states=True)
    return (o, ht), (q, k, v, gcum, beta, seg, states, t, w)


def _core_bwd(cfg, res, cts):
    q, k, v, gcum, beta, seg, states, t, w = res
    do, dht = cts
    x, tp, dk = q.shape
    dv = v.shape[-1]
    n, c, nvb = tp // cfg.chunk, cfg.chunk, dv // cfg.vb
    ins = _SEQ + (Arg("s0", "cstate", vblocked=True), Arg("do", "seq", vblocked=True),
                  Arg("dhT", "state", vblocked=True))
    outs = (Arg("dq", "seq", partial=True), Arg("dk", "seq", partial=True), Arg("dv", "seq", vblocked=True),
            Arg("dbeta", "col", partial=True), Arg("dg", "col", partial=True),
            Arg("dh0", "state", vblocked=True))
    plan = Plan(_bwd_step, ins, outs, "dhT", "dh0", n, c, cfg.vb, nvb, reverse=True)
    args = dict(q=q, k=k, v=v, **_gate_args(gcum, beta, seg), t=t, w=w, s0=states, do=do.astype(v.dtype),
                dhT=dht.astype(F32))
    sds = jax.ShapeDtypeStruct
    shapes = dict(dq=sds((nvb, x, tp, dk), F32), dk=sds((nvb, x, tp, dk), F32), dv=sds((x, tp, dv), F32),
                  dbeta=sds((nvb, x, n, c, 1), F32), dg=sds((nvb, x, n, c, 1), F32),
                  dh0=sds((x, dk, dv), F32))
    r = pc.run(plan, args, shapes, cfg.backend, cfg.interpret, num_warps=cfg.num_warps)
    dq, dk_ = (r[nm].sum(0).astype(q.dtype) for nm in ("dq", "dk"))
    dbeta = r["dbeta"].sum(0)[..., 0]
    dg = r["dg"].sum(0)[..., 0]
    return dq, dk_, r["dv"].astype(v.dtype), dg, dbeta, jnp.zeros_like(seg), r["dh0"]


_core.defvjp(_core_fwd, _core_bwd)


def default_vb(backend: str, dv: int) -> int:
    """Value block: 64 columns on GPU (state 256 x 64 fp32 in registers), 128 lanes on TPU, else all of dv."""
    want = 128 if backend == "tpu" else 64
    return want if dv % want == 0 and dv > want else dv


def unsupported(backend: str, dk: int, dv: int, chunk: int) -> str | None:
    """Why the Pallas kernel cannot take this shape on ``backend`` (None if it can)."""
    if backend == "gpu":
        for name, d in (("d_k", dk), ("d_v", dv), ("chunk_size", chunk)):
            if not pc.is_pow2(d) or d < 16:
                return f"{name}={d} is not a power of two >= 16 (Triton block shapes)"
        if dk > 256:
            return f"d_k={dk} > 256 (the fp32 state block would not fit in registers)"
        return ("its backward is slower than 'chunked' on the H100 (fwd+bwd 31.8 vs 13.9 ms at 4x4096; "
                "fwd 3.1 vs 4.6 ms), see benchmarks/RESULTS.md; pass impl='pallas' to use it")
    else:
        if chunk % 8:
            return f"chunk_size={chunk} is not a multiple of 8 (TPU sublane tiling)"
        vb = default_vb(backend, dv)
        if vb % 128 and vb != dv:
            return f"d_v={dv} has no 128-multiple block"
    return None


def gated_delta_pallas(q, k, v, g, beta, state, reset, chunk_size: int, *, backend: str, interpret=None,
                       vb: int | None = None):
    """Pallas path of `gated_delta_rule` on prepared inputs: q (scaled) and k in their compute dtype,
    v, g, beta as given, state fp32 [b, h, dk, dv], reset bool [b, t]. Returns (o [b, t, h, dv] v.dtype,
    final state fp32)."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = chunk_size
    pad = -t % c
    tp = t + pad
    n = tp // c
    # g = 0 and beta = 0 make padded tokens identity steps.
    q, k, v, g, beta = (pc.pad_time(z, pad) for z in (q, k, v, g, beta))
    reset = pc.pad_time(reset, pad)
    seg = pc.chunk_segments(reset, c)  # [b, n, C]
    seg = jnp.broadcast_to(seg[:, None], (b, h, n, c)).reshape(b * h, n, c)

    def rows(z):  # [b, tp, h, ...] -> [b*h, tp, ...]
        return jnp.moveaxis(z, 2, 1).reshape(b * h, tp, *z.shape[3:])

    gcum = jnp.cumsum(rows(g.astype(F32)).reshape(b * h, n, c), axis=-1)
    beta_r = rows(beta.astype(F32)).reshape(b * h, n, c)
    cfg = Config(c, vb or default_vb(backend, dv), backend, interpret)
    o, ht = _core(cfg, rows(q), rows(k), rows(v), gcum, beta_r, seg, state.reshape(b * h, dk, dv))
    o = jnp.moveaxis(o.reshape(b, h, tp, dv), 1, 2)[:, :t]
    return o, ht.reshape(b, h, dk, dv)
