"""Mamba2 state-space duality (SSD) scan as pure JAX functions.

Per batch b, head h and time t, with state h_t of shape [head_dim P, d_state N]:

    dt_t = clip(softplus(dt_raw_t + dt_bias_h), *dt_limit)        (softplus only if dt_softplus)
    h_t  = exp(dt_t * A_h) * h_{t-1} + dt_t * x_t ⊗ B_t
    y_t  = h_t @ C_t + D_h * x_t

B and C come in G groups; head h reads group h // (H // G). Layout is [batch, time, heads, dim].
With ``segment_ids`` (packed sequences) the state is reset to zero before every token whose id differs
from the previous token's, so each document sees only itself; ``initial_state`` feeds the first one.

Gates, decays, states and all accumulation are fp32 whatever the input dtype; y has x's dtype.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int

from . import mosaic_ssd, pallas_common, pallas_ssd

__all__ = ["discretize_dt", "ssd", "ssd_step"]

_F32 = jnp.float32


def discretize_dt(
    dt: Float[Array, "*batch h"],
    dt_bias: Float[Array, " h"] | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
) -> Float[Array, "*batch h"]:
    """dt = clip(softplus(dt + dt_bias), *dt_limit) in fp32 (softplus only if ``dt_softplus``)."""
    dt = dt.astype(_F32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(_F32)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    return jnp.clip(dt, dt_limit[0], dt_limit[1])


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _validate(x, dt, A, B, C, D, dt_bias, initial_state, *, time_axis: bool) -> None:
    """Raise ValueError naming the offending dimension when shapes are inconsistent."""
    lead = 2 if time_axis else 1  # (b, t) or (b,)
    what = "[b, t, h, p]" if time_axis else "[b, h, p]"
    _check(x.ndim == lead + 2, f"x must be {what}, got shape {x.shape}")
    batch, (h, p) = x.shape[:lead], x.shape[lead:]
    _check(dt.shape == (*batch, h), f"dt must have shape {(*batch, h)} (batch/time/heads of x), got {dt.shape}")
    _check(A.shape == (h,), f"A must have shape (heads,) = {(h,)}, got {A.shape}")
    _check(B.ndim == lead + 2, f"B must be {'[b, t, g, n]' if time_axis else '[b, g, n]'}, got shape {B.shape}")
    _check(B.shape[:lead] == batch, f"B batch/time dims {B.shape[:lead]} do not match x's {batch}")
    _check(C.shape == B.shape, f"C shape {C.shape} does not match B shape {B.shape} (groups and d_state must agree)")
    g, n = B.shape[lead:]
    _check(g > 0 and h % g == 0, f"heads ({h}) must be divisible by n_groups ({g})")
    for name, v in (("D", D), ("dt_bias", dt_bias)):
        got = getattr(v, "shape", None)
        _check(v is None or v.shape == (h,), f"{name} must have shape (heads,) = {(h,)}, got {got}")
    want = (batch[0], h, p, n)
    _check(
        initial_state is None or initial_state.shape == want,
        f"state must have shape [b, h, p, n] = {want}, got {getattr(initial_state, 'shape', None)}",
    )


def _step(
    state: Float[Array, "b h p n"],
    x: Float[Array, "b h p"],
    dt: Float[Array, "b h"],
    decay: Float[Array, "b h"],
    B: Float[Array, "b g n"],
    C: Float[Array, "b g n"],
) -> tuple[Float[Array, "b h p"], Float[Array, "b h p n"]]:
    """h = decay * h + dt * x ⊗ B;  y = h @ C   (fp32, no D term)."""
    r = x.shape[1] // B.shape[1]
    Bh, Ch = jnp.repeat(B, r, axis=1), jnp.repeat(C, r, axis=1)  # [b, h, n]
    state = decay[..., None, None] * state + jnp.einsum("bhp,bhn->bhpn", x * dt[..., None], Bh)
    return jnp.einsum("bhpn,bhn->bhp", state, Ch), state


def _ssd_reference(x, dt, A, B, C, reset, initial_state, chunk_size):
    """Sequential oracle: ``lax.scan`` of the recurrence over time (``chunk_size`` unused)."""
    del chunk_size

    def body(state, inp):
        x_t, dt_t, B_t, C_t, reset_t = inp
        decay = jnp.where(reset_t[:, None], 0.0, jnp.exp(dt_t * A))
        y_t, state = _step(state, x_t, dt_t, decay, B_t, C_t)
        return state, y_t

    time_major = [jnp.moveaxis(v, 1, 0) for v in (x, dt, B, C, reset)]
    final, y = jax.lax.scan(body, initial_state, time_major)
    return jnp.moveaxis(y, 0, 1), final


def _segsum(a: Float[Array, "... l"]) -> Float[Array, "... l l"]:
    """Exact segment sums S[i, j] = sum_{j < k <= i} a_k for i >= j (0 above the diagonal).

    Built by a masked cumulative sum down each column, never as a difference of prefix sums.
    """
    l = a.shape[-1]
    strict_lower = jnp.tril(jnp.ones((l, l), bool), -1)
    return jnp.cumsum(jnp.where(strict_lower, a[..., :, None], 0.0), axis=-2)


def _ssd_chunked(x, dt, A, B, C, reset, initial_state, chunk_size):
    """SSD chunked algorithm (Dao & Gu 2024).

    Within a chunk: y = (C B^T ∘ L) (dt x) with L[i, j] = exp(S[i, j]) for j <= i in the same document.
    Chunk states s_c = sum_j exp(S[-1, j]) dt_j x_j ⊗ B_j; the chunk-boundary states
    H_c = exp(sum a_c) H_{c-1} + s_c come from an associative scan over chunks; then
    y_i += exp(sum_{k <= i} a_k) H_{c-1} @ C_i. Document boundaries zero every decay that crosses them.
    """
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    r, l = h // g, chunk_size
    pad = -t % l
    c = (t + pad) // l

    def chunk(v):  # [b, t, ...] -> [b, c, l, ...], zero-padded; zero dt makes padded steps identity maps
        v = jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
        return v.reshape(b, c, l, *v.shape[2:])

    xdt = chunk((x * dt[..., None]).reshape(b, t, g, r, p))  # [b, c, l, g, r, p]
    Bc, Cc = chunk(B), chunk(C)  # [b, c, l, g, n]
    a = jnp.moveaxis(chunk(dt.reshape(b, t, g, r)), 2, -1) * A.reshape(g, r, 1)  # log-decay [b, c, g, r, l]
    doc = jnp.cumsum(chunk(reset).astype(jnp.int32), axis=-1)  # resets so far in the chunk [b, c, l]
    doc = doc[:, :, None, None]  # broadcast over [g, r]

    # 1. intra-chunk (diagonal blocks)
    S = _segsum(a)  # [b, c, g, r, l, l]
    causal = jnp.tril(jnp.ones((l, l), bool))
    L = jnp.where(causal & (doc[..., :, None] == doc[..., None, :]), jnp.exp(S), 0.0)
    CB = jnp.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    y = jnp.einsum("bcgrls,bcsgrp->bclgrp", CB[:, :, :, None] * L, xdt)

    # 2. per-chunk states (decayed to the chunk end, only from the chunk's last document)
    to_end = jnp.where(doc == doc[..., -1:], jnp.exp(S[..., -1, :]), 0.0)  # [b, c, g, r, l]
    states = jnp.einsum("bclgn,bclgrp->bcgrpn", Bc, jnp.moveaxis(to_end, -1, 2)[..., None] * xdt)

    # 3. inter-chunk recurrence H_c = decay_c * H_{c-1} + s_c, by associative scan over (decay, state)
    from_start = jnp.where(doc == 0, jnp.exp(jnp.cumsum(a, axis=-1)), 0.0)  # [b, c, g, r, l]
    chunk_decay = from_start[..., -1]  # [b, c, g, r]

    def combine(earlier, later):
        (d1, s1), (d2, s2) = earlier, later
        return d1 * d2, d2[..., None, None] * s1 + s2

    cum_decay, H = jax.lax.associative_scan(combine, (chunk_decay, states), axis=1)
    h0 = initial_state.reshape(b, 1, g, r, p, n)
    H = H + cum_decay[..., None, None] * h0  # state after each chunk [b, c, g, r, p, n]
    H_prev = jnp.concatenate([h0, H[:, :-1]], axis=1)

    # 4. state -> output (off-diagonal blocks)
    y = y + jnp.einsum("bclgn,bcgrpn->bclgrp", Cc, H_prev) * jnp.moveaxis(from_start, -1, 2)[..., None]
    return y.reshape(b, c * l, h, p)[:, :t], H[:, -1].reshape(b, h, p, n)


_IMPLS: dict[str, Callable] = {"reference": _ssd_reference, "chunked": _ssd_chunked}


def _unsupported(driver: str, dtype, p: int, n: int, chunk: int) -> str | None:
    if driver == "mosaic_gpu":
        return mosaic_ssd.unsupported(p, n, chunk, dtype)
    return pallas_ssd.unsupported(driver, p, n, chunk)


def fills_gpu(batch: int, heads: int) -> bool:
    """Whether the Pallas SSD kernels' one program per (sequence, head) fills >= 3/4 of the GPU's SMs, where
    their forward + backward beats the chunked path's. The kernels walk each sequence alone, so below that
    their time is one sequence's, the chunked path's the whole batch's. Measured on the H200 (132 SMs, bf16,
    32 heads, ms): 4 x 4096 (128 programs) 2.07 vs 3.70 (g32n64), 3.32 vs 4.20 (g1n128); 1 x 16K (32
    programs) 5.88 vs 3.76, 7.70 vs 4.15 (benchmarks/RESULTS.md, sessions 8-9)."""
    return 4 * batch * heads >= 3 * pallas_common.gpu_cores()


def _kernel_forward_chunked_vjp(kernel: Callable, chunk_size: int) -> Callable:
    """The SSD `kernel` (Pallas path: x, B, C in their compute dtype) where nothing differentiates (inference,
    prefill); under differentiation the chunked path's forward and VJP on the same operands. y comes out
    fp32 either way. On the GPU the kernel's forward is 1.3-3.8x faster than the chunked one and its
    forward + backward slower at B = 1 (H200, benchmarks/RESULTS.md). Forward-mode (jvp) is not defined."""
    def chunked(x, dt, A, B, C, reset, h0):
        return _ssd_chunked(x.astype(_F32), dt, A, B.astype(_F32), C.astype(_F32), reset, h0, chunk_size)

    @jax.custom_vjp
    def run(x, dt, A, B, C, reset, h0):
        y, final = kernel(x, dt, A, B, C, reset, h0)
        return y.astype(_F32), final

    def forward(x, dt, A, B, C, reset, h0):
        return jax.vjp(lambda x, dt, A, B, C, h0: chunked(x, dt, A, B, C, reset, h0), x, dt, A, B, C, h0)

    def backward(vjp, cotangents):
        dx, ddt, dA, dB, dC, dh0 = vjp(cotangents)
        return dx, ddt, dA, dB, dC, None, dh0  # reset (bool) has no cotangent

    run.defvjp(forward, backward)
    return run


def ssd(
    x: Float[Array, "b t h p"],
    dt: Float[Array, "b t h"],
    A: Float[Array, " h"],
    B: Float[Array, "b t g n"],
    C: Float[Array, "b t g n"],
    *,
    D: Float[Array, " h"] | None = None,
    dt_bias: Float[Array, " h"] | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    initial_state: Float[Array, "b h p n"] | None = None,
    segment_ids: Int[Array, "b t"] | None = None,
    chunk_size: int = 64,
    impl: str = "auto",
) -> tuple[Float[Array, "b t h p"], Float[Array, "b h p n"]]:
    """Mamba2 SSD scan over a sequence; returns (y [x.dtype], final state [fp32]).

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t,  y_t = h_t @ C_t + D x_t, with dt as in ``ssd_step``.
    ``segment_ids`` reset the state to zero at every change of id; ``initial_state`` feeds the first
    segment only. ``impl``: "chunked" (SSD algorithm, chunks of ``chunk_size``), "reference"
    (sequential scan), "pallas" (the Pallas kernels of `pallas_ssd`, or on a Hopper GPU those of `mosaic_ssd`:
    `pallas_common.gpu_drivers`; matmul operands in x/B/C's dtype) or
    "auto" (Pallas on GPU/TPU when the shape is supported, else "chunked" with a logged reason; "chunked"
    on CPU; on GPU with the Triton kernels, unless batch x heads fills the GPU (`fills_gpu`), the Pallas
    forward only where nothing differentiates and "chunked" under `jax.grad`: see
    `_kernel_forward_chunked_vjp`; the Mosaic kernels' fwd+bwd always). The final state is the state after
    the last token.
    """
    if impl not in pallas_common.IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {list(pallas_common.IMPLS)}")
    is_int = isinstance(chunk_size, int) and not isinstance(chunk_size, bool)
    if not is_int or chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a positive power of two, got {chunk_size!r}")
    _validate(x, dt, A, B, C, D, dt_bias, initial_state, time_axis=True)
    b, t, h, p = x.shape
    _check(
        segment_ids is None or segment_ids.shape == (b, t),
        f"segment_ids must have shape [b, t] = {(b, t)}, got {getattr(segment_ids, 'shape', None)}",
    )

    dt32 = discretize_dt(dt, dt_bias, dt_softplus, dt_limit)
    reset: Bool[Array, "b t"]
    if segment_ids is None:
        reset = jnp.zeros((b, t), bool)
    else:
        reset = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
    if initial_state is None:
        h0 = jnp.zeros((b, h, p, B.shape[-1]), _F32)
    else:
        h0 = initial_state.astype(_F32)
    requested = impl
    impl, backend, interpret = pallas_common.choose("ssd", impl, lambda be: _unsupported(be, x.dtype, p, B.shape[-1],
                                                                                       chunk_size))
    x32 = x.astype(_F32)
    if impl == "pallas":
        def on_device(x, *args):  # per device under a mesh: its own batch and heads decide
            if backend == "mosaic_gpu":
                return mosaic_ssd.ssd_mosaic(x, *args, chunk_size, interpret=interpret)
            run = functools.partial(pallas_ssd.ssd_pallas, chunk_size=chunk_size, backend=backend,
                                    interpret=interpret)
            if requested == "auto" and backend == "gpu" and not fills_gpu(x.shape[0], x.shape[2]):
                run = _kernel_forward_chunked_vjp(run, chunk_size)
            return run(x, *args)

        run = pallas_common.on_mesh(
            on_device,
            lambda r, hd: ((P(r, None, hd, None), P(r, None, hd), P(hd), P(r, None, hd, None), P(r, None, hd, None),
                            P(r, None), P(r, hd, None, None)), (P(r, None, hd, None), P(r, hd, None, None))),
            b, h, B.shape[2])
        y, final = run(x, dt32, A.astype(_F32), B, C, reset, h0)
        if D is not None:
            y = y.astype(_F32) + D.astype(_F32)[:, None] * x32
        return y.astype(x.dtype), final
    y, final = _IMPLS[impl](
        x32, dt32, A.astype(_F32), B.astype(_F32), C.astype(_F32), reset, h0, chunk_size
    )
    if D is not None:
        y = y + D.astype(_F32)[:, None] * x32
    return y.astype(x.dtype), final


def ssd_step(
    state: Float[Array, "b h p n"],
    x_t: Float[Array, "b h p"],
    dt_t: Float[Array, "b h"],
    A: Float[Array, " h"],
    B_t: Float[Array, "b g n"],
    C_t: Float[Array, "b g n"],
    *,
    D: Float[Array, " h"] | None = None,
    dt_bias: Float[Array, " h"] | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> tuple[Float[Array, "b h p"], Float[Array, "b h p n"]]:
    """One decode step; returns (y_t [x_t.dtype], new state [fp32]).

    dt = clip(softplus(dt_t + dt_bias), *dt_limit);  h = exp(dt A) h + dt x_t ⊗ B_t;  y_t = h @ C_t + D x_t.
    """
    _validate(x_t, dt_t, A, B_t, C_t, D, dt_bias, state, time_axis=False)
    dt32 = discretize_dt(dt_t, dt_bias, dt_softplus, dt_limit)
    x32 = x_t.astype(_F32)
    y, state = _step(
        state.astype(_F32), x32, dt32, jnp.exp(dt32 * A.astype(_F32)), B_t.astype(_F32), C_t.astype(_F32)
    )
    if D is not None:
        y = y + D.astype(_F32)[:, None] * x32
    return y.astype(x_t.dtype), state
