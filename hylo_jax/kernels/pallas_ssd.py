"""Pallas kernels for the chunked Mamba2 SSD scan, forward and backward (`jax.custom_vjp`).

One program per (batch*head) carries the fp32 state S [d_state N, head_dim P] over the chunks. In a chunk
(G the chunk-local cumulative log-decay dt*A, v = dt x; `pallas_common.decays` masks segment resets):

    y  = ((C B^T) o E) v + (e^{G} C) S              S' = e^{G_C} S + (e^{G_C - G} B)^T v

B and C are read from the head's group (no copies per head). The forward saves the state entering every
chunk; the backward walks the chunks in reverse carrying dS and writes per-head dB, dC (the wrapper sums
the heads of a group), dx, d(dt) and dG (the wrapper's cumsum / dt*A / softplus chain does the rest).
Matmul operands in the inputs' dtype, accumulation and state in fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import pallas_common as pc
from .pallas_common import F32, Arg, Config, Plan, mm

_SEQ = (Arg("x", "seq"), Arg("dtc", "col"), Arg("b", "seq", grouped=True), Arg("c", "seq", grouped=True),
        Arg("gc", "col"), Arg("gr", "row"), Arg("sc", "col"), Arg("sr", "row"))


def _prepare(ins):
    x, dtc, bm, cm = ins["x"], ins["dtc"], ins["b"], ins["c"]
    cdt = x.dtype
    dec = pc.decays(ins["gc"], ins["gr"], ins["sc"], ins["sr"])
    v = (dtc * x.astype(F32)).astype(cdt)
    cb = mm(cm, bm, tb=True)
    return cdt, dec, v, cb


def _fwd_step(save_states: bool):
    def step(ins, s):
        cdt, dec, v, cb = _prepare(ins)
        bm, cm = ins["b"], ins["c"]
        lo = lambda z: z.astype(cdt)  # noqa: E731
        y = mm(lo(cb * dec.causal), v) + mm(lo(dec.d_in * cm.astype(F32)), lo(s))
        s_new = dec.d_chunk * s + mm(lo(dec.d_out * bm.astype(F32)), v, ta=True)
        outs = {"y": y}
        if save_states:
            outs["s0"] = s
        return outs, s_new

    return step


def _bwd_step(ins, ds):
    cdt, dec, v, cb = _prepare(ins)
    x, dtc, bm, cm, s0, dy = ins["x"], ins["dtc"], ins["b"], ins["c"], ins["s0"], ins["dy"]
    lo = lambda z: z.astype(cdt)  # noqa: E731
    bm32, cm32 = bm.astype(F32), cm.astype(F32)
    dv = mm(lo(cb * dec.causal), dy, ta=True) + mm(lo(dec.d_out * bm32), lo(ds))
    ds0 = mm(lo(dec.d_in * cm32), dy, ta=True) + dec.d_chunk * ds
    dp = mm(dy, v, tb=True)
    dcb = dp * dec.causal
    dy_s = mm(dy, lo(s0), tb=True)
    v_ds = mm(v, lo(ds), tb=True)
    dc = dec.d_in * dy_s + mm(lo(dcb), bm)
    db = mm(lo(dcb), cm, ta=True) + dec.d_out * v_ds
    dd_in = jnp.sum(dy_s * cm32, axis=1, keepdims=True)
    dd_out = jnp.sum(v_ds * bm32, axis=1, keepdims=True)
    dd_chunk = jnp.sum(jnp.sum(s0 * ds, axis=1, keepdims=True), axis=0, keepdims=True)
    dg = pc.decay_grads(dec, dcb * cb, dd_in, dd_out, dd_chunk)
    outs = {"dx": dtc * dv, "ddt": jnp.sum(dv * x.astype(F32), axis=1, keepdims=True), "db": db, "dc": dc,
            "dg": dg}
    return outs, ds0


def _group_of(h: int, g: int):
    r = h // g
    return lambda i: (i // h) * g + (i % h) // r


def _forward(cfg: Config, h: int, x, dt, bm, cm, gcum, seg, h0, save_states: bool):
    rows, tp, p = x.shape
    nst = bm.shape[-1]
    g = bm.shape[0] * h // rows
    n, c = tp // cfg.chunk, cfg.chunk
    outs = (Arg("y", "seq"), Arg("hT", "state"))
    if save_states:
        outs += (Arg("s0", "cstate"),)
    plan = Plan(_fwd_step(save_states), _SEQ + (Arg("h0", "state"),), outs, "h0", "hT", n, c, p, 1,
                group_of=_group_of(h, g))
    args = dict(x=x, dtc=pc.as_col(dt), b=bm, c=cm, gc=pc.as_col(gcum), gr=pc.as_row(gcum),
                sc=pc.as_col(seg), sr=pc.as_row(seg), h0=h0)
    sds = jax.ShapeDtypeStruct
    shapes = dict(y=sds((rows, tp, p), x.dtype), hT=sds((rows, nst, p), F32), s0=sds((rows, n, nst, p), F32))
    r = pc.run(plan, args, shapes, cfg.backend, cfg.interpret, num_warps=cfg.num_warps,
               num_stages=cfg.num_stages)
    return r["y"], r["hT"], r.get("s0")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _core(cfg: Config, h: int, x, dt, bm, cm, gcum, seg, h0):
    y, ht, _ = _forward(cfg, h, x, dt, bm, cm, gcum, seg, h0, save_states=False)
    return y, ht


def _core_fwd(cfg, h, x, dt, bm, cm, gcum, seg, h0):
    y, ht, states = _forward(cfg, h, x, dt, bm, cm, gcum, seg, h0, save_states=True)
    return (y, ht), (x, dt, bm, cm, gcum, seg, states)


def _core_bwd(cfg, h, res, cts):
    x, dt, bm, cm, gcum, seg, states = res
    dy, dht = cts
    rows, tp, p = x.shape
    g = bm.shape[0] * h // rows
    n, c = tp // cfg.chunk, cfg.chunk
    ins = _SEQ + (Arg("s0", "cstate"), Arg("dy", "seq"), Arg("dhT", "state"))
    outs = (Arg("dx", "seq"), Arg("ddt", "col"), Arg("db", "seq"), Arg("dc", "seq"), Arg("dg", "col"),
            Arg("dh0", "state"))
    plan = Plan(_bwd_step, ins, outs, "dhT", "dh0", n, c, p, 1, reverse=True, group_of=_group_of(h, g))
    args = dict(x=x, dtc=pc.as_col(dt), b=bm, c=cm, gc=pc.as_col(gcum), gr=pc.as_row(gcum),
                sc=pc.as_col(seg), sr=pc.as_row(seg), s0=states, dy=dy.astype(x.dtype), dhT=dht.astype(F32))
    sds = jax.ShapeDtypeStruct
    nst = bm.shape[-1]
    shapes = dict(dx=sds((rows, tp, p), F32), ddt=sds((rows, n, c, 1), F32), db=sds((rows, tp, nst), F32),
                  dc=sds((rows, tp, nst), F32), dg=sds((rows, n, c, 1), F32), dh0=sds((rows, nst, p), F32))
    r = pc.run(plan, args, shapes, cfg.backend, cfg.interpret, num_warps=cfg.num_warps,
               num_stages=cfg.num_stages)
    b = rows // h

    def to_groups(z):  # per-head [b*h, tp, N] -> per-group [b*g, tp, N]
        return z.reshape(b, g, h // g, tp, nst).sum(2).reshape(b * g, tp, nst)

    return (r["dx"].astype(x.dtype), r["ddt"][..., 0].reshape(dt.shape), to_groups(r["db"]).astype(bm.dtype),
            to_groups(r["dc"]).astype(cm.dtype), r["dg"][..., 0], jnp.zeros_like(seg), r["dh0"])


_core.defvjp(_core_fwd, _core_bwd)


def unsupported(backend: str, p: int, n: int, chunk: int) -> str | None:
    """Why the Pallas kernel cannot take this shape on ``backend`` (None if it can)."""
    if backend == "gpu":
        for name, d in (("head_dim", p), ("d_state", n), ("chunk_size", chunk)):
            if not pc.is_pow2(d) or d < 16:
                return f"{name}={d} is not a power of two >= 16 (Triton block shapes)"
        if p * n > 128 * 128:
            return f"state {n} x {p} too large for registers"
    elif chunk % 8:
        return f"chunk_size={chunk} is not a multiple of 8 (TPU sublane tiling)"
    return None


def ssd_pallas(x, dt, A, B, C, reset, h0, chunk_size: int, *, backend: str, interpret=None, num_warps: int = 4,
               num_stages: int | None = None):
    """Pallas path of `ssd` without the D term: x, B, C in their compute dtype, dt fp32 (discretised),
    A fp32 [h], reset bool [b, t], h0 fp32 [b, h, p, n]. Returns (y [b, t, h, p] x.dtype, state fp32).
    ``num_warps``, ``num_stages``: Triton launch settings (`benchmarks/scan_launch.py` sweeps them; H200,
    g32n64: 4 warps and 3 stages took 1 x 16K from 1.78 / 8.53 to 1.13 / 6.19 ms fwd / fwd+bwd); by default
    as many stages (<= 3) as fit (`pallas_common.fit_stages`)."""
    b, t, h, p = x.shape
    g, nst = B.shape[2:]
    c = chunk_size
    pad = -t % c
    tp = t + pad
    n = tp // c
    x, dt, B, C = (pc.pad_time(z, pad) for z in (x, dt, B, C))  # dt = 0: padded steps are identities
    seg = pc.chunk_segments(pc.pad_time(reset, pad), c)
    seg = jnp.broadcast_to(seg[:, None], (b, h, n, c)).reshape(b * h, n, c)

    def rows(z):  # [b, tp, h, ...] -> [b*h, tp, ...]
        return jnp.moveaxis(z, 2, 1).reshape(z.shape[0] * z.shape[2], tp, *z.shape[3:])

    dt_r = rows(dt).reshape(b * h, n, c)
    gcum = jnp.cumsum(dt_r * jnp.tile(A, b)[:, None, None], axis=-1)
    if num_stages is None:  # B and C rows feed the matmuls directly; the state converts through shared memory
        isz = B.dtype.itemsize
        num_stages = pc.fit_stages(2 * c * nst * isz, nst * p * 4, itemsize=isz)
    cfg = Config(c, p, backend, interpret, num_warps, num_stages)
    y, ht = _core(cfg, h, rows(x), dt_r, rows(B), rows(C), gcum, seg,
                  jnp.swapaxes(h0, -1, -2).reshape(b * h, nst, p))
    y = jnp.moveaxis(y.reshape(b, h, tp, p), 1, 2)[:, :t]
    return y, jnp.swapaxes(ht.reshape(b, h, nst, p), -1, -2)
