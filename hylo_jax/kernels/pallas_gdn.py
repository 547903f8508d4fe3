"""Pallas kernels for the sequential part of the chunked gated delta rule (`gated_delta._chunked`):

    delta_c = u_c - w_c S_c,      S_{c+1} = d_c S_c + k_c^T delta_c              (forward)
    D_c = delta_bar_c + k_c G_{c+1},  G_c = S_bar_c + d_c G_{c+1} - w_c^T D_c     (backward, c descending)

(`gated_delta.chunk_state_recurrence`). One program per (batch*head, value block) carries its [dk, vb]
block of the fp32 state (registers on GPU, VMEM on TPU) over the chunks: two matmuls per chunk. The rest of
the rule (the UT transform, the outputs, every gradient that only reads the states) stays as batched XLA
matmuls over all chunks at once, which is where the FLOPs are.

Matmul operands are in `dtype` (bf16 for bf16 layers, as fla does; fp32 gives the exact IEEE product),
and so are the per-chunk states S_c and cotangents G_{c+1} that go through HBM (the largest arrays: dk x dv
per chunk and head; fla stores them in the input dtype too); the carried state, deltas and all
accumulation are fp32. Layout in and out is the chunked path's [b, h, n, C, d]; the kernels' [b*h, n*C, d]
rows are a reshape of it (no transposes).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from . import pallas_common as pc
from .pallas_common import F32, Arg, Plan, mm


def _fwd_step(ins, s):
    w, k = ins["w"], ins["k"]
    delta = ins["u"] - mm(w, s.astype(w.dtype))
    s_next = pc.last_row(ins["d"]) * s + mm(k, delta.astype(k.dtype), ta=True)
    return {"states": s, "deltas": delta}, s_next


def _bwd_step(ins, g):
    w, k = ins["w"], ins["k"]
    d_delta = ins["deltas_bar"] + mm(k, g.astype(k.dtype))
    g_prev = ins["states_bar"] + pc.last_row(ins["d"]) * g - mm(w, d_delta.astype(w.dtype), ta=True)
    return {"g_next": g, "d_deltas": d_delta}, g_prev


def chunk_rows(x):
    """[b, h, n, ...] -> [b*h, n, ...] (program rows first)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def seq_rows(x):
    """[b, h, n, C, d] -> [b*h, n*C, d]."""
    return x.reshape(x.shape[0] * x.shape[1], -1, x.shape[-1])


def _unrows(x, shape: tuple[int, ...]):
    """[b*h, n, ...] or [b*h, n*C, d] back to the chunked layout `shape` = [b, h, n, ...]."""
    return x.reshape(shape)


def _decay_col(decay, c: int):
    """[b, h, n] -> [b*h, n, C, 1]: each chunk's decay as a column (the drivers move columns per chunk)."""
    rows = chunk_rows(decay)
    return jnp.broadcast_to(rows[..., None, None], (*rows.shape, c, 1))


def _run(step, ins: tuple[Arg, ...], outs: tuple[Arg, ...], carry: tuple[str, str], args: dict, shapes: dict,
         n: int, c: int, vb: int, reverse: bool, backend: str, interpret, gpu_kw: dict):
    dv = args[carry[0]].shape[-1]
    plan = Plan(step, ins, outs, carry[0], carry[1], n, c, vb, dv // vb, reverse=reverse)
    w = args["w"]  # `pc.run` passes the launch settings to the Triton driver only
    return pc.run(plan, args, shapes, backend, interpret, **{**gpu_launch(c, w.shape[-1], vb, w.dtype), **gpu_kw})


GPU_MIN_VB = 16  # Triton's smallest dot operand


def gpu_launch(c: int, dk: int, vb: int, dtype: Any) -> dict:
    """Triton launch settings: 4 warps and as many pipeline stages as fit (the next chunks' w_c, k_c load
    while this chunk computes; the state and delta blocks convert to matmul operands through shared memory).
    Swept on an H200 in `benchmarks/scan_launch.py`: vb 32 ran 3 stages, vb 64 only 2."""
    isz = jnp.dtype(dtype).itemsize
    return dict(num_warps=4, num_stages=pc.fit_stages(2 * c * dk * isz, (dk + c) * vb * isz, itemsize=isz))


def default_vb(backend: str, dv: int, rows: int | None = None) -> int:
    """Value block: 128 lanes on TPU; on GPU 32 columns, halved (down to 16) while fewer than half the SMs
    would get a program. Every program re-reads the whole w_c, k_c of its head per chunk, so narrower blocks
    multiply the bytes; swept on an H200 (`benchmarks/scan_launch.py`), 32 beat 16 even at 96 programs."""
    want = 128 if backend == "tpu" else 32
    vb = want if dv % want == 0 and dv > want else dv
    if backend == "gpu" and rows:
        while vb > GPU_MIN_VB and pc.is_pow2(vb) and 2 * rows * (dv // vb) < pc.gpu_cores():
            vb //= 2
    return vb


def unsupported(backend: str, dk: int, dv: int, chunk: int) -> str | None:
    """Why the Pallas kernels cannot take this shape on ``backend`` (None if they can)."""
    if backend == "gpu":
        vb = default_vb(backend, dv)
        for name, d in (("d_k", dk), ("value block (d_v or 32)", vb), ("chunk_size", chunk)):
            if not pc.is_pow2(d) or d < 16:
                return f"{name}={d} is not a power of two >= 16 (Triton block shapes)"
        if dk > 256:
            return f"d_k={dk} > 256 (the fp32 state block would not fit in registers)"
    elif chunk % 8:
        return f"chunk_size={chunk} is not a multiple of 8 (TPU sublane tiling)"
    elif (vb := default_vb(backend, dv)) % 128 and vb != dv:
        return f"d_v={dv} has no 128-multiple block"
    return None


def scans(backend: str, interpret: Any, dtype: Any, vb: int | None = None, **gpu_kw):
    """(forward, backward) of `gated_delta.chunk_state_recurrence` on the Pallas kernels of ``backend``
    ("gpu": Triton, "tpu": Mosaic TPU), matmul operands in ``dtype``; `gated_delta.make_recurrence` joins them.
    ``gpu_kw`` (num_warps, num_stages) go to the Triton driver.

    forward(u, w, k, decay, state) -> (states, deltas, final state);
    backward(w, k, decay, states_bar, deltas_bar, final_bar) -> (G_0, G_{c+1} per chunk, D per chunk)."""
    sds = jax.ShapeDtypeStruct

    def forward(u, w, k, decay, state):
        b, h, n, c, dv = u.shape
        x, dk = b * h, w.shape[-1]
        args = dict(u=seq_rows(u).astype(F32), w=seq_rows(w).astype(dtype), k=seq_rows(k).astype(dtype),
                    d=_decay_col(decay, c), s0=state.reshape(x, dk, dv))
        shapes = dict(states=sds((x, n, dk, dv), dtype), deltas=sds((x, n * c, dv), F32), sT=sds((x, dk, dv), F32))
        r = _run(_fwd_step, (Arg("u", "seq", vblocked=True), Arg("w", "seq"), Arg("k", "seq"), Arg("d", "col"),
                             Arg("s0", "state", vblocked=True)),
                 (Arg("states", "cstate", vblocked=True), Arg("deltas", "seq", vblocked=True),
                  Arg("sT", "state", vblocked=True)), ("s0", "sT"), args, shapes, n, c,
                 vb or default_vb(backend, dv, x), False, backend, interpret, gpu_kw)
        return _unrows(r["states"], (b, h, n, dk, dv)), _unrows(r["deltas"], u.shape), r["sT"].reshape(state.shape)

    def backward(w, k, decay, states_bar, deltas_bar, final_bar):
        b, h, n, c, dv = deltas_bar.shape
        x, dk = b * h, w.shape[-1]
        args = dict(w=seq_rows(w).astype(dtype), k=seq_rows(k).astype(dtype), d=_decay_col(decay, c),
                    states_bar=chunk_rows(states_bar).astype(dtype), deltas_bar=seq_rows(deltas_bar).astype(F32),
                    gT=final_bar.reshape(x, dk, dv).astype(F32))
        shapes = dict(g_next=sds((x, n, dk, dv), dtype), d_deltas=sds((x, n * c, dv), F32), g0=sds((x, dk, dv), F32))
        r = _run(_bwd_step, (Arg("w", "seq"), Arg("k", "seq"), Arg("d", "col"),
                             Arg("states_bar", "cstate", vblocked=True), Arg("deltas_bar", "seq", vblocked=True),
                             Arg("gT", "state", vblocked=True)),
                 (Arg("g_next", "cstate", vblocked=True), Arg("d_deltas", "seq", vblocked=True),
                  Arg("g0", "state", vblocked=True)), ("gT", "g0"), args, shapes, n, c,
                 vb or default_vb(backend, dv, x), True, backend, interpret, gpu_kw)
        return (r["g0"].reshape(final_bar.shape), _unrows(r["g_next"], states_bar.shape),
                _unrows(r["d_deltas"], deltas_bar.shape))

    return forward, backward
