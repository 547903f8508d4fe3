"""Shared machinery of the Pallas chunk-scan kernels (GDN and SSD): one program per (row, value block)
carries an fp32 state over the chunks of a sequence; the per-chunk maths is a plain function of arrays
(`step`) shared by two drivers:

* ``"gpu"``: the Pallas Triton backend. Grid (rows, value blocks); each program runs a `fori_loop` over
  the chunks with the state in registers and reads/writes chunk slices of whole-array refs. On CPU it runs
  with ``interpret=True``.
* ``"tpu"``: Mosaic TPU. Grid (rows, value blocks, chunks) with the chunk axis "arbitrary" and the state in
  a VMEM scratch; BlockSpecs move one chunk per step. Every block's last two dims are full dims or
  (chunk, full) with chunk a multiple of 8, so the blocks follow the TPU tiling rules. On CPU it runs in TPU
  interpret mode (`pltpu.InterpretParams`, race detection and raising out-of-bounds reads in tests).

Array kinds (X = rows, batch*heads, or groups for SSD's B/C; n chunks of C; V the value width split in
``nvb`` blocks of ``vb``):
  seq   [X, n*C, D]      one (C, D) block per chunk (value-blocked: (C, vb))
  col   [X, n, C, 1]     per-position scalars as a column (gates, beta, segment index)
  row   [X, n, 1, C]     the same as a row (for the [C, C] decay matrices)
  state [X, D, V]        read at the first step (carry init) or written after the last (final carry)
  cstate [X, n, D, V]    one state per chunk (residual: the state entering each chunk)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from hylo_jax.sharding import batch_axes, heads_axis

from .mosaic_common import interpret_params

F32 = jnp.float32
logger = logging.getLogger("hylo_jax.kernels")

# jax 0.11 warns at every lowering that the Pallas Triton backend is deprecated (Mosaic GPU replaces it).
warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")


# ----------------------------------------------------------------------------- maths helpers (in-kernel)
def mm(a, b, ta: bool = False, tb: bool = False):
    """a @ b (with a or b transposed) in fp32 accumulation; fp32 operands get the exact (IEEE) product."""
    if a.dtype != b.dtype:  # operands share one dtype (Triton's dot needs it): the narrower one
        low = b.dtype if a.dtype == F32 else a.dtype
        a, b = a.astype(low), b.astype(low)
    dims = (((0,) if ta else (1,), (1,) if tb else (0,)), ((), ()))
    prec = lax.Precision.HIGHEST if a.dtype == F32 and b.dtype == F32 else None
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=F32)


def masked_exp(x, mask):
    """exp(x) where mask else exactly 0 (masked before the exp: no inf from the other side)."""
    return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def iotas(c: int):
    return lax.broadcasted_iota(jnp.int32, (c, c), 0), lax.broadcasted_iota(jnp.int32, (c, c), 1)


def last_row(col):
    """The last entry of a (C, 1) column as a (1, 1) array (no scalar extraction: portable)."""
    c = col.shape[0]
    idx = lax.broadcasted_iota(jnp.int32, col.shape, 0)
    return jnp.sum(jnp.where(idx == c - 1, col, 0.0), axis=0, keepdims=True)


def col_of_rowsum(z):
    """Column sums of z as a (C, 1) column (row sums of z^T: a 2-D transpose, no vector relayout)."""
    return jnp.sum(z.T, axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Decays:
    """Masks and decay factors of one chunk from the chunk-local cumulative log-decay G and segment index."""

    causal: jax.Array  # (C, C) i >= j, same segment: exp(G_i - G_j) else 0
    d_in: jax.Array  # (C, 1) exp(G_i) for positions still in the carried-in segment, else 0
    d_out: jax.Array  # (C, 1) exp(G_last - G_j) for positions in the last segment, else 0
    d_chunk: jax.Array  # (1, 1) exp(G_last) if the chunk has no reset, else 0


def decays(gcol, grow, scol, srow) -> Decays:
    c = gcol.shape[0]
    rows, cols = iotas(c)
    same = scol == srow
    causal = masked_exp(gcol - grow, (rows >= cols) & same)
    g_last, s_last = last_row(gcol), last_row(scol)
    d_in = masked_exp(gcol, scol == 0)
    d_out = masked_exp(g_last - gcol, scol == s_last)
    d_chunk = masked_exp(g_last, s_last == 0)
    return Decays(causal, d_in, d_out, d_chunk)


def decay_grads(dec: Decays, z, dd_in, dd_out, dd_chunk):
    """dL/dG (C, 1) given z = dL/dE * E summed over E's uses, dL/dd_in, dL/dd_out (C, 1), dL/dd_chunk (1, 1)."""
    c = z.shape[0]
    idx = lax.broadcasted_iota(jnp.int32, (c, 1), 0)
    t_out = dd_out * dec.d_out
    to_last = jnp.sum(t_out, axis=0, keepdims=True) + dd_chunk * dec.d_chunk
    return (jnp.sum(z, axis=1, keepdims=True) - col_of_rowsum(z) + dd_in * dec.d_in - t_out
            + jnp.where(idx == c - 1, to_last, 0.0))


# ----------------------------------------------------------------------------- drivers
@dataclasses.dataclass(frozen=True)
class Arg:
    name: str
    kind: str  # seq | col | row | state | cstate
    vblocked: bool = False  # blocked along the last (value) axis
    grouped: bool = False  # rows are groups: row index = group_of(program row)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static settings of one kernel call."""

    chunk: int
    vb: int  # value block
    backend: str  # "gpu" (Triton) | "tpu" (Mosaic TPU)
    interpret: Any = None  # None / False on device; True (generic) or pltpu.InterpretParams on CPU
    num_warps: int = 4
    num_stages: int = 1  # Triton software pipelining of the chunk loop's loads


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of one scan kernel."""

    step: Callable  # step(ins: dict, carry) -> (outs: dict, carry)
    ins: tuple[Arg, ...]
    outs: tuple[Arg, ...]
    carry_in: str  # name of the state input that initialises the carry
    carry_out: str  # name of the state output that receives the final carry
    n: int  # chunks
    chunk: int
    vb: int  # value block
    nvb: int
    reverse: bool = False
    group_of: Callable | None = None  # program row -> group row (for grouped inputs)


def _row(plan: Plan, arg: Arg, i):
    return plan.group_of(i) if arg.grouped else i


GPU_SHARED_BYTES = 227 * 1024  # shared memory per block on Hopper


def fit_stages(dot_load_bytes: int, scratch_bytes: int = 0, most: int = 3, itemsize: int = 2) -> int:
    """Triton `num_stages` (<= most) for a chunk loop: stages > 1 software-pipeline it (the next chunks'
    loads overlap this chunk's matmuls). Each stage buffers the loads that feed matmuls directly
    (``dot_load_bytes`` per chunk) in shared memory, next to ``scratch_bytes`` of layout conversions; a
    model that matches what the compiler accepted and refused in `benchmarks/scan_launch.py` (bf16). Operands of
    4 bytes (``itemsize``) take about twice their bytes per stage: on the H200 (jax 0.11.2) 3 stages of the fp32
    SSD at d_state 128 asked for 341 KB."""
    per_stage = dot_load_bytes * (2 if itemsize == 4 else 1)
    return max(1, min(most, (GPU_SHARED_BYTES - scratch_bytes) // per_stage))


def run_gpu(plan: Plan, args: dict, out_shapes: dict, *, interpret: bool, num_warps: int = 4,
            num_stages: int = 1):
    """Triton-backend driver: grid (rows, value blocks), a sequential loop over chunks per program."""
    from jax.experimental.pallas import triton as pltriton

    in_names = [a.name for a in plan.ins]
    out_names = [a.name for a in plan.outs]
    rows_n = args[plan.carry_in].shape[0]
    c, vb, n = plan.chunk, plan.vb, plan.n

    def kernel(*refs):
        in_refs = dict(zip(in_names, refs[: len(in_names)]))
        out_refs = dict(zip(out_names, refs[len(in_names):]))
        i, j = pl.program_id(0), pl.program_id(1)
        vsl = pl.ds(j * vb, vb)

        def index(arg: Arg, ck):
            r = _row(plan, arg, i)
            v = vsl if arg.vblocked else slice(None)
            if arg.kind == "seq":
                return (r, pl.ds(ck * c, c), v)
            if arg.kind in ("col", "row"):
                return (r, ck, slice(None), slice(None))
            if arg.kind == "cstate":
                return (r, ck, slice(None), v)
            return (r, slice(None), v)

        def body(t, carry):
            ck = n - 1 - t if plan.reverse else t
            ins = {a.name: in_refs[a.name][index(a, ck)] for a in plan.ins if a.kind != "state"}
            outs, carry = plan.step(ins, carry)
            for a in plan.outs:
                if a.kind != "state":
                    out_refs[a.name][index(a, ck)] = outs[a.name].astype(out_refs[a.name].dtype)
            return carry

        carry0 = in_refs[plan.carry_in][index(_arg(plan.ins, plan.carry_in), 0)].astype(F32)
        carry = lax.fori_loop(0, n, body, carry0)
        out_refs[plan.carry_out][index(_arg(plan.outs, plan.carry_out), 0)] = carry

    params = None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    outs = pl.pallas_call(
        kernel,
        out_shape=[out_shapes[nm] for nm in out_names],
        grid=(rows_n, plan.nvb),
        interpret=interpret,
        compiler_params=params,
    )(*[args[nm] for nm in in_names])
    return dict(zip(out_names, outs))


def _arg(specs, name):
    return next(a for a in specs if a.name == name)


def run_tpu(plan: Plan, args: dict, out_shapes: dict, *, interpret=None):
    """Mosaic TPU driver: grid (rows, value blocks, chunks), chunk axis sequential, state in VMEM scratch."""
    from jax.experimental.pallas import tpu as pltpu

    c, vb, n = plan.chunk, plan.vb, plan.n
    rows_n = args[plan.carry_in].shape[0]

    def ck_of(k):
        return n - 1 - k if plan.reverse else k

    def spec(arg: Arg, shape):
        d_last = vb if arg.vblocked else shape[-1]
        if arg.kind == "seq":
            block = (None, c, d_last)
        elif arg.kind in ("col", "row"):
            block = (None, None, *shape[-2:])  # full (C, 1) or (1, C)
        elif arg.kind == "cstate":
            block = (None, None, shape[-2], d_last)
        else:
            block = (None, shape[-2], d_last)

        def index_map(i, j, k):
            r = _row(plan, arg, i)
            jv = j if arg.vblocked else 0
            if arg.kind == "seq":
                return (r, ck_of(k), jv)
            if arg.kind in ("col", "row"):
                return (r, ck_of(k), 0, 0)
            if arg.kind == "cstate":
                return (r, ck_of(k), 0, jv)
            return (r, 0, jv)

        return pl.BlockSpec(block, index_map)

    def kernel(*refs):
        ni = len(plan.ins)
        in_refs = dict(zip([a.name for a in plan.ins], refs[:ni]))
        out_refs = dict(zip([a.name for a in plan.outs], refs[ni: ni + len(plan.outs)]))
        scratch = refs[-1]
        k = pl.program_id(2)

        @pl.when(k == 0)
        def _():
            scratch[...] = in_refs[plan.carry_in][...].astype(F32)

        ins = {a.name: in_refs[a.name][...] for a in plan.ins if a.kind != "state"}
        outs, carry = plan.step(ins, scratch[...])
        for a in plan.outs:
            if a.kind != "state":
                out_refs[a.name][...] = outs[a.name].astype(out_refs[a.name].dtype)
        scratch[...] = carry

        @pl.when(k == n - 1)
        def _():
            out_refs[plan.carry_out][...] = carry

    state_shape = args[plan.carry_in].shape
    kw = {}
    if interpret is not None:
        kw["interpret"] = interpret
    outs = pl.pallas_call(
        kernel,
        out_shape=[out_shapes[a.name] for a in plan.outs],
        grid=(rows_n, plan.nvb, n),
        in_specs=[spec(a, args[a.name].shape) for a in plan.ins],
        out_specs=[spec(a, out_shapes[a.name].shape) for a in plan.outs],
        scratch_shapes=[pltpu.VMEM((state_shape[-2], vb), F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        **kw,
    )(*[args[a.name] for a in plan.ins])
    return dict(zip([a.name for a in plan.outs], outs))


def with_vma(out_shapes: dict, args: dict) -> dict:
    """Output shapes that vary over the same shard_map axes as the inputs (needed under check_vma=True).

    The keyword is `manual_axis_type` on jax 0.10 and `vma` on other versions; outside shard_map it is empty."""
    avals = [jax.typeof(a) for a in args.values()]
    params = inspect.signature(jax.ShapeDtypeStruct).parameters
    if "manual_axis_type" in params and all(getattr(a, "mat", None) is not None for a in avals):
        widest = max(avals, key=lambda a: len(a.mat.varying)).mat
        kw = {"manual_axis_type": widest}
    elif "vma" in params and all(getattr(a, "vma", None) is not None for a in avals):
        kw = {"vma": frozenset().union(*(a.vma for a in avals))}
    else:
        return out_shapes
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, **kw) for k, v in out_shapes.items()}


def run(plan: Plan, args: dict, out_shapes: dict, backend: str, interpret, **gpu_kw):
    out_shapes = with_vma(out_shapes, args)
    if backend == "tpu":
        return run_tpu(plan, args, out_shapes, interpret=interpret)
    return run_gpu(plan, args, out_shapes, interpret=bool(interpret), **gpu_kw)


def on_mesh(fn: Callable, specs: Callable, batch: int, *head_counts: int) -> Callable:
    """`fn` in a `shard_map` over batch (data/fsdp) and heads (tensor) when a multi-device mesh is set and
    no axis is already manual; else `fn`. A pallas_call is opaque to the SPMD partitioner, which would
    gather its inputs and run it whole on every device; rows and heads of these ops are independent.
    `specs(rows, heads) -> (in_specs, out_specs)` builds the PartitionSpecs from the two mesh entries."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or jax.sharding.AxisType.Manual in mesh.axis_types:
        return fn
    in_specs, out_specs = specs(batch_axes(mesh, batch), heads_axis(mesh, *head_counts))
    # check_vma off: JAX's generic Pallas interpreter (CPU) fails its own varying-axes check in shard_map.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


# ----------------------------------------------------------------------------- layout helpers (wrapper side)
def pad_time(x, pad: int, axis: int = 1):
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def chunk_segments(reset, c: int):
    """Chunk-local segment index (resets seen so far in the chunk) as fp32 [b, n, C]; reset [b, n*C]."""
    b, tp = reset.shape
    return jnp.cumsum(reset.reshape(b, tp // c, c).astype(jnp.int32), axis=-1).astype(F32)


def as_col(x):  # [X, n, C] -> [X, n, C, 1]
    return x[..., None]


def as_row(x):  # [X, n, C] -> [X, n, 1, C]
    return x[..., None, :]


# ----------------------------------------------------------------------------- dispatch
def platform() -> str:
    return jax.default_backend()


@functools.cache
def _log_once(op: str, reason: str) -> None:
    logger.warning("%s: impl='auto' falls back to 'chunked': %s", op, reason)


def gpu_capability_ok(driver: str = "gpu") -> tuple[bool, str]:
    """Whether the first device can run the GPU `driver` ("gpu": Pallas Triton, sm80+; "mosaic_gpu": Hopper,
    sm90: the kernels are wgmma ones)."""
    cap = getattr(jax.devices()[0], "compute_capability", None)
    if driver == "mosaic_gpu":
        return is_hopper(), f"GPU compute capability {cap} is not 9.x ({GPU_DRIVERS[driver]} kernels: wgmma)"
    try:
        ok = cap is not None and float(cap) >= 8.0
    except (TypeError, ValueError):
        ok = False
    return ok, f"GPU compute capability {cap} < 8.0 ({GPU_DRIVERS[driver]} kernels)"


GPU_DRIVERS = {"gpu": "Pallas Triton", "mosaic_gpu": "Mosaic GPU (Hopper)"}
GPU_KERNELS = {"auto": ("mosaic_gpu", "gpu"), "triton": ("gpu",), "mosaic": ("mosaic_gpu",)}  # name -> drivers
_GPU_KERNELS: list[str] = []


@contextlib.contextmanager
def gpu_kernels(name: str):
    """Run the Pallas paths on GPU with these kernels: "auto" (the default), "triton" or "mosaic" (Hopper:
    `mosaic_ssd`, `mosaic_gdn`). Outside it the environment variable HYLO_GPU_KERNELS decides."""
    _check_gpu_kernels(name)
    _GPU_KERNELS.append(name)
    try:
        yield
    finally:
        _GPU_KERNELS.pop()


def _check_gpu_kernels(name: str) -> str:
    if name not in GPU_KERNELS:
        raise ValueError(f"GPU kernels must be one of {list(GPU_KERNELS)} (HYLO_GPU_KERNELS), got {name!r}")
    return name


def is_hopper() -> bool:
    """Whether the first device is a Hopper GPU (compute capability 9.x: wgmma, the Mosaic GPU kernels)."""
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


# The ops whose "auto" tries the Mosaic GPU kernels first on Hopper. GDN since session 16, SSD since session 19:
# every pass ran on an H100 under jax.grad, and against an fp32 reference on the benchmark's bf16 inputs their
# outputs and gradients are as close as jax-linear-attention's and mamba_ssm's (`benchmarks/accuracy.py`,
# benchmarks/RESULTS.md).
MOSAIC_FIRST_ON_HOPPER: frozenset[str] = frozenset({"gated_delta_rule", "ssd"})


def gpu_drivers(op: str) -> tuple[str, ...]:
    """The Pallas drivers to try on GPU for `op` ("gated_delta_rule", "ssd"), in order ("mosaic_gpu", "gpu":
    Triton), from `gpu_kernels` or HYLO_GPU_KERNELS. "auto": Mosaic first on Hopper for the ops in
    `MOSAIC_FIRST_ON_HOPPER`, then Triton for the shapes Mosaic does not take; Triton elsewhere."""
    name = _check_gpu_kernels(_GPU_KERNELS[-1] if _GPU_KERNELS else os.environ.get("HYLO_GPU_KERNELS", "auto"))
    if name == "auto" and not (op in MOSAIC_FIRST_ON_HOPPER and is_hopper()):
        return ("gpu",)
    return GPU_KERNELS[name]


def gpu_cores() -> int:
    """Streaming multiprocessors of the first device (132 on an H100 SXM when it does not say)."""
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def grid_cores(interpret) -> int:
    """The SMs a Mosaic GPU kernel sizes its grid for: the device's, or an H100's 132 under the GPU interpreter
    (CPU tests then see the grid a GPU would run)."""
    return 132 if interpret else gpu_cores()


_OVERRIDE: list = []  # tests: [(backend, interpret)] forces the Pallas backend and interpret mode


@contextlib.contextmanager
def force_backend(backend: str, interpret):
    """Run impl="pallas" with this driver ("gpu" | "tpu") and interpret setting (tests on CPU)."""
    _OVERRIDE.append((backend, interpret))
    try:
        yield
    finally:
        _OVERRIDE.pop()


IMPLS = ("auto", "pallas", "chunked", "reference")


def choose(op: str, impl: str, unsupported: Callable[[str], str | None]) -> tuple[str, str | None, object]:
    """(impl to run, Pallas driver or None, interpret). ``unsupported(driver)`` gives a reason or None.

    Drivers: "mosaic_gpu" and / or "gpu" (Pallas Triton) on a GPU, tried in order (`gpu_drivers`), "tpu".
    "auto": the first driver that the GPU can run / TPU and that takes the shape, else "chunked" with a warning
    logged once per reason; on CPU "auto" is "chunked". "pallas" on CPU runs the GPU driver in its interpreter.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {list(IMPLS)}")
    if impl in ("chunked", "reference"):
        return impl, None, None
    plat = platform()
    drivers = (plat,) if plat == "tpu" else gpu_drivers(op)
    if impl == "pallas":
        if _OVERRIDE:
            return "pallas", *_OVERRIDE[-1]
        if plat in ("gpu", "tpu"):  # the first driver that takes the shape; else the first, which says why not
            return "pallas", next((d for d in drivers if unsupported(d) is None), drivers[0]), None
        return "pallas", drivers[0], interpret_params() if drivers[0] == "mosaic_gpu" else True
    if plat not in ("gpu", "tpu"):
        return "chunked", None, None
    reasons = []
    for driver in drivers:
        ok, why = gpu_capability_ok(driver) if plat == "gpu" else (True, "")
        reason = unsupported(driver) if ok else why
        if reason is None:
            return "pallas", driver, None
        reasons.append(reason)
    _log_once(op, "; ".join(reasons))
    return "chunked", None, None


def is_pow2(x: int) -> bool:
    return x > 0 and not x & (x - 1)
