"""Token-mixer kernels: ours vs peer kernels at HyLo-Llama-1B shapes, bf16 inputs.

Prints one table: forward and forward+backward time, tokens/s, achieved TFLOP/s and its fraction of
the bf16 matmul ceiling measured in the same run, and peak device memory, for
  gdn  gated delta rule, 6 heads, d_k 256, d_v 512: ours `gated_delta_rule(impl="chunked")`;
       fla `chunk_gated_delta_rule`; jax-linear-attention "gated_deltanet" (chunked, mosaic_gpu)
  ssd  Mamba2 SSD "g32n64" (32 heads, head_dim 64, d_state 64, 32 groups) and "g1n128" (32 heads,
       head_dim 64, d_state 128, 1 group): ours `ssd(impl="chunked")`; mamba_ssm
       `mamba_chunk_scan_combined`; jax-linear-attention "simple_gla" (q=C, k=B, v=dt x, g=dt A)
  mla  causal training attention through our `attention` dispatch (cuDNN on GPU), 32 heads,
       8 kv heads, qk and v head dim 64 (HyLo-1B MLA: qk_nope 32 + rope 32, v 64), B=1
Peers that do not import get one line and no row. A failing cell says OOM / refused / error.

FLOPs are the useful matmul FLOPs of the chunked algorithm (chunk c = 64, causal triangles
counted half), the same count for every implementation of an op, so TFLOP/s ranks like 1/time:
  gdn  fwd = B T H [6 dk dv + c (3 dk + 2 dv)]   (W S, Q S, K^T delta; K K^T, Q K^T, the
                                                   triangular solve for [u, w], attn @ delta)
  ssd  fwd = B T [H (4 N P + c P) + G c N]       (B^T x states, C H; (C B^T o L) x; C B^T per group)
  mla  fwd = B H T^2 (d_qk + d_v)                (Q K^T and P V, causal half)
  fwd+bwd = 3 x fwd (backward = 2 x forward), as in teacher_forward.py.
Time: median over 3 samples of `--iters` back-to-back calls (one sync per sample, so host
dispatch overlaps device work; CUDA events for the PyTorch peers). Peak memory: JAX rows take
arguments + outputs + temporaries of the compiled executable, PyTorch rows
torch.cuda.max_memory_allocated; "n/a" where jax.devices()[0].memory_stats() is None (CPU).
    python benchmarks/mixers.py [--only gdn,ssd,mla] [--shapes 4x4096,1x65536] [--iters N]
    python benchmarks/mixers.py --tiny     # CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import os
import statistics
import sys
import time
import types
from pathlib import Path

# Before JAX starts: share the GPU with the PyTorch peers (no up-front grab of 75% of its memory),
# and keep the peers' Triton autotune results on disk for reruns on the same machine.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from common import matmul_ceiling_tflops, print_table  # noqa: E402

from hylo_jax.kernels.attention import attention, resolve_impl  # noqa: E402
from hylo_jax.kernels.gated_delta import gated_delta_rule  # noqa: E402
from hylo_jax.kernels.ssd import ssd  # noqa: E402

CHUNK = 64  # our chunk size, and the c of the FLOP formulas
MAMBA_CHUNK = 256  # mamba_ssm's own default (Mamba2 module)
SHAPES = [(4, 4096), (1, 16384), (1, 65536)]
MLA_SHAPES = [(1, 8192), (1, 65536)]
TINY_SHAPES = [(2, 128), (1, 256)]
FULL = dict(gdn=dict(h=6, dk=256, dv=512),
            ssd={"g32n64": dict(h=32, p=64, n=64, g=32), "g1n128": dict(h=32, p=64, n=128, g=1)},
            mla=dict(h=32, hk=8, d=64))
TINY = dict(gdn=dict(h=2, dk=32, dv=64),
            ssd={"g32n64": dict(h=4, p=16, n=16, g=4), "g1n128": dict(h=4, p=16, n=32, g=1)},
            mla=dict(h=4, hk=2, d=32))


# ---------------------------------------------------------------- FLOPs
def gdn_flops(b, t, h, dk, dv, c=CHUNK):
    return b * t * h * (6 * dk * dv + c * (3 * dk + 2 * dv))


def ssd_flops(b, t, h, p, n, g, c=CHUNK):
    return b * t * (h * (4 * n * p + c * p) + g * c * n)


def mla_flops(b, t, h, d, dv):
    return b * h * t * t * (d + dv)


# ---------------------------------------------------------------- peers
def _first_line(err: BaseException, width: int = 70) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text}"[:width]


def load_peers() -> dict:
    """Peer callables that import; one 'not installed' line for each that does not."""
    peers = {}

    def fla():
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        return chunk_gated_delta_rule

    def mamba():
        if importlib.util.find_spec("mamba_ssm") is None:
            raise ModuleNotFoundError("No module named 'mamba_ssm'")
        # The CUDA selective-scan extension is not built (pure-Python wheel); SSD needs only Triton.
        sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        return mamba_chunk_scan_combined

    def jla():
        errors = []
        for name in ("jla.ops", "jax_linear_attention.ops"):  # the wheel's package is `jla`
            try:
                return importlib.import_module(name).linear_attention
            except ImportError as err:
                errors.append(err)
        raise errors[0]

    for name, load in (("fla", fla), ("mamba_ssm", mamba), ("jax-linear-attention", jla)):
        try:
            peers[name] = load()
        except Exception as err:  # any import failure means "not installed" here
            print(f"peer {name} not installed: {_first_line(err, 200)}")
    return peers


# ---------------------------------------------------------------- timing
def _samples(run, sync, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        sync(run())
    return statistics.median(_sample(run, sync, iters) for _ in range(3))


def _sample(run, sync, iters):
    t0 = time.perf_counter()
    for _ in range(iters):
        out = run()
    sync(out)
    return (time.perf_counter() - t0) / iters


def bench_jax(fn, args: list, iters: int, track_memory: bool):
    """(seconds per call, peak GiB or None) of jit(fn)(*args)."""
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = _samples(lambda: compiled(*args), jax.block_until_ready, iters)
    peak = None
    if track_memory:
        m = compiled.memory_analysis()
        peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                - m.alias_size_in_bytes) / 2**30
    return seconds, peak


def bench_torch(run, iters: int):
    """(seconds per call, peak GiB or None) of run(), CUDA events on GPU."""
    import torch

    if not torch.cuda.is_available():
        return _samples(run, lambda _: None, iters), None
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        run()
    samples = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            run()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / iters)
    return statistics.median(samples), torch.cuda.max_memory_allocated() / 2**30


def jax_passes(fn, inputs: list, dout):
    """[(function, its arguments)] for the forward and the forward+backward over all inputs."""
    def fwd_bwd(*args):
        _, vjp = jax.vjp(fn, *args[:-1])
        return vjp(args[-1])
    return [(fn, inputs), (fwd_bwd, [*inputs, dout])]


def torch_passes(fn, inputs: list, dout):
    """[forward, forward+backward] closures over the inputs (which require grad)."""
    import torch

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def fwd_bwd():
        for x in inputs:
            x.grad = None
        fn(*inputs).backward(dout)
    return [fwd, fwd_bwd]


def failure(err: BaseException) -> str:
    text = str(err)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "OOM"
    if "#640" in text or "upgrade Triton" in text:  # fla 0.6 on Hopper with Triton < 3.7.1
        return "refused"
    return "error: " + _first_line(err, 60)


def free_device_memory():
    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
        sys.modules["torch"].cuda.empty_cache()


# ---------------------------------------------------------------- data and implementations
def jla_impls() -> tuple[str, ...]:
    """jax-linear-attention's implementations to time: its Mosaic GPU kernels need a Hopper GPU."""
    return ("chunked", "mosaic_gpu") if jax.default_backend() == "gpu" else ("chunked",)


def _l2(x):
    return x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)


def gdn_case(rng, b, t, h, dk, dv):
    r = lambda *s: rng.standard_normal(s, dtype=np.float32)
    data = dict(q=_l2(r(b, t, h, dk)), k=_l2(r(b, t, h, dk)), v=r(b, t, h, dv),
                g=np.log(rng.uniform(0.9, 1.0, (b, t, h))).astype(np.float32),
                beta=(1 / (1 + np.exp(-r(b, t, h)))))
    dtypes = dict(q="bfloat16", k="bfloat16", v="bfloat16", g="float32", beta="bfloat16")
    return data, dtypes, (b, t, h, dv), gdn_flops(b, t, h, dk, dv)


def gdn_impls(peers, dk):
    impls = [("ours chunked", "jax", lambda q, k, v, g, beta: gated_delta_rule(q, k, v, g, beta, impl="chunked")[0])]
    if "fla" in peers:
        f = peers["fla"]
        impls.append(("fla", "torch", lambda q, k, v, g, beta: f(q, k, v, g, beta, scale=dk**-0.5)[0]))
    if "jax-linear-attention" in peers:
        la = peers["jax-linear-attention"]
        for impl in jla_impls():
            impls.append((f"jla {impl}", "jax", lambda q, k, v, g, beta, impl=impl: la(
                "gated_deltanet", q, k, v, g=g, beta=beta, scale=dk**-0.5, impl=impl)[0]))
    return impls


def ssd_case(rng, b, t, h, p, n, g):
    r = lambda *s: rng.standard_normal(s, dtype=np.float32)
    dt0 = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), h)).astype(np.float32)
    data = dict(x=r(b, t, h, p), dt=0.5 * r(b, t, h),
                A=-np.exp(rng.uniform(0.0, np.log(16.0), h)).astype(np.float32),
                B=r(b, t, g, n), C=r(b, t, g, n), dt_bias=dt0 + np.log(-np.expm1(-dt0)))
    dtypes = dict(x="bfloat16", dt="float32", A="float32", B="bfloat16", C="bfloat16", dt_bias="float32")
    return data, dtypes, (b, t, h, p), ssd_flops(b, t, h, p, n, g)


def ssd_impls(peers):
    def ours(x, dt, A, B, C, dt_bias):
        return ssd(x, dt, A, B, C, dt_bias=dt_bias, chunk_size=CHUNK, impl="chunked")[0]

    impls = [("ours chunked", "jax", ours)]
    if "mamba_ssm" in peers:
        f = peers["mamba_ssm"]
        impls.append((f"mamba_ssm (chunk {MAMBA_CHUNK})", "torch", lambda x, dt, A, B, C, dt_bias: f(
            x, dt, A, B, C, chunk_size=MAMBA_CHUNK, dt_bias=dt_bias, dt_softplus=True)))
    if "jax-linear-attention" in peers:
        la = peers["jax-linear-attention"]

        def jla(x, dt, A, B, C, dt_bias, impl):
            dt = jax.nn.softplus(dt + dt_bias)
            if impl == "chunked":  # jla's chunked op wants q/k with all heads; its kernel takes groups
                B, C = (jnp.repeat(z, x.shape[2] // z.shape[2], axis=2) for z in (B, C))
            v = (x * dt[..., None]).astype(x.dtype)
            return la("simple_gla", C, B, v, g=dt * A, scale=1.0, impl=impl)[0]

        for impl in jla_impls():
            impls.append((f"jla {impl}", "jax", lambda *a, impl=impl: jla(*a, impl=impl)))
    return impls


def mla_case(rng, b, t, h, hk, d):
    r = lambda *s: rng.standard_normal(s, dtype=np.float32)
    data = dict(q=r(b, t, h, d), k=r(b, t, hk, d), v=r(b, t, hk, d))
    return data, dict.fromkeys(data, "bfloat16"), (b, t, h, d), mla_flops(b, t, h, d, d)


def mla_impls(t):
    return [(f"ours attention ({resolve_impl('auto', t, None)})", "jax", lambda q, k, v: attention(q, k, v))]


# ---------------------------------------------------------------- driver
def run_case(op, case, impls, ceiling, iters, track_memory, rows):
    data, dtypes, out_shape, flops = case
    b, t = out_shape[:2]
    rng = np.random.default_rng(1)
    dout = rng.standard_normal(out_shape, dtype=np.float32)
    for name, framework, fn in impls:
        if framework == "jax":
            args = [jnp.asarray(data[k], dtype=dtypes[k]) for k in data]
            passes = jax_passes(fn, args, jnp.asarray(dout, jnp.bfloat16))
        else:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            args = [torch.from_numpy(data[k]).to(device, getattr(torch, dtypes[k])).requires_grad_()
                    for k in data]
            passes = torch_passes(fn, args, torch.from_numpy(dout).to(device, torch.bfloat16))
        for mode, run, mult in (("fwd", passes[0], 1), ("fwd+bwd", passes[1], 3)):
            try:
                if framework == "jax":
                    seconds, peak = bench_jax(*run, iters, track_memory)
                else:
                    seconds, peak = bench_torch(run, iters)
                tflops = mult * flops / seconds / 1e12
                cells = [seconds * 1e3, b * t / seconds, tflops, tflops / ceiling,
                         "n/a" if peak is None else peak]
            except Exception as err:  # report the cell and go on
                cells = [failure(err), "-", "-", "-", "-"]
            row = [op, f"{b}x{t}", name, mode, *cells]
            print("  " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in row),
                  file=sys.stderr, flush=True)
            rows.append(row)
        del args, passes
        free_device_memory()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--only", default="gdn,ssd,mla", help="comma list of gdn, ssd, mla")
    parser.add_argument("--shapes", default="", help="only these B x T, e.g. 4x4096,1x65536")
    parser.add_argument("--iters", type=int, default=None, help="calls per timed sample (default 20; 5 with --tiny)")
    args = parser.parse_args()
    ops = set(args.only.split(","))
    if ops - {"gdn", "ssd", "mla"}:
        parser.error(f"--only takes gdn, ssd, mla; got {args.only}")
    iters = args.iters or (5 if args.tiny else 20)
    dims = TINY if args.tiny else FULL
    shapes, mla_shapes = (TINY_SHAPES, TINY_SHAPES) if args.tiny else (SHAPES, MLA_SHAPES)
    if args.shapes:
        keep = {tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")}
        shapes, mla_shapes = [s for s in shapes if s in keep], [s for s in mla_shapes if s in keep]

    device = jax.devices()[0]
    track_memory = device.memory_stats() is not None
    ceiling = matmul_ceiling_tflops(512 if args.tiny else 8192)
    print(f"device: {device.device_kind}; jax {jax.__version__}; "
          f"measured bf16 matmul ceiling {ceiling:.3g} TFLOP/s")
    peers = load_peers() if ops & {"gdn", "ssd"} else {}
    if "jax-linear-attention" in peers and "mosaic_gpu" not in jla_impls():
        print("peer jax-linear-attention mosaic_gpu skipped: its kernels need a Hopper GPU")
    rng = np.random.default_rng(0)
    rows: list[list] = []
    for b, t in shapes if "gdn" in ops else []:
        d = dims["gdn"]
        run_case("gdn", gdn_case(rng, b, t, **d), gdn_impls(peers, d["dk"]), ceiling, iters,
                 track_memory, rows)
    for variant, d in dims["ssd"].items() if "ssd" in ops else []:
        for b, t in shapes:
            run_case(f"ssd {variant}", ssd_case(rng, b, t, **d), ssd_impls(peers), ceiling, iters,
                     track_memory, rows)
    for b, t in mla_shapes if "mla" in ops else []:
        run_case("mla", mla_case(rng, b, t, **dims["mla"]), mla_impls(t), ceiling, iters,
                 track_memory, rows)
    print_table(["op", "B x T", "impl", "pass", "ms", "tokens/s", "TFLOP/s", "of ceiling", "peak GiB"], rows)


if __name__ == "__main__":
    main()
