"""Shared benchmark helpers: timing, the measured matmul ceiling, a table printer."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


def time_jax(fn: Callable, *args, warmup: int = 3, iters: int = 20) -> float:
    """Median wall seconds of fn(*args) after warm-up (compile excluded), synchronised per call."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def time_jax_one_ahead(fn: Callable, *, warmup: int = 1, iters: int = 20) -> float:
    """Mean wall seconds per call of fn() in the trainer's loop: each call is queued before the host waits on
    the previous one's result (`train.trainer.train_stage`), so the device never idles for the host between
    calls; one call is in flight at a time besides the one running."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    previous = fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        current = fn()
        jax.block_until_ready(previous)
        previous = current
    jax.block_until_ready(previous)
    return (time.perf_counter() - t0) / (iters + 1)


def time_torch(fn: Callable, warmup: int = 3, iters: int = 20) -> float:
    """Median seconds of fn() with CUDA events when on GPU, else wall time."""
    import torch

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def matmul_ceiling_tflops(n: int = 8192) -> float:
    """Measured bf16 matmul TFLOP/s of an n^3 product on the default JAX device."""
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / time_jax(f, a, a) / 1e12


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, r in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
