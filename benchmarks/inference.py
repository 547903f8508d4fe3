"""Long-context inference: Llama-3.2-1B teacher vs HyLo-Llama-1B hybrid (8 MLA + 8 GDN), bf16, random weights.

Prints one table per context T: cache GiB (from the cache shapes), prefill tokens/s, decode tokens/s (B=1,
`--decode` steps in the jitted loop, compile excluded), or OOM where the context does not fit the device.
Up to `--full-prefill` tokens the whole prompt is prefilled chunk by chunk (first chunk excluded: it
compiles). Beyond it, the full cache of T slots is allocated and filled with synthetic values (attention
cost does not depend on them), one chunk is prefilled at position 0 and one at T - chunk, and decode runs
from T: "prefill tok/s" is then the chunk-averaged rate (time linear in position), and "prefill s" the
whole-prompt time it implies. Writes benchmarks/inference.png (tokens/s and cache memory vs context).
    python benchmarks/inference.py [--contexts 8192,65536,262144,1048576,2097152] [--chunk 8192]
    python benchmarks/inference.py --models hybrid --out rows.jsonl   # runs that add up to one table
    python benchmarks/inference.py --tensor 2 --contexts 2097152   # tensor parallel over 2 GPUs (sharded caches)
    python benchmarks/inference.py --tiny      # CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table  # noqa: E402
from distill_step import specs  # noqa: E402

from hylo_jax.config import MeshConfig  # noqa: E402
from hylo_jax.config import replace as replace_config  # noqa: E402
from hylo_jax.infer.engine import Engine, EngineConfig, _decode, _head, _init_caches, _prefill_chunk  # noqa: E402
from hylo_jax.infer.sampling import SamplingConfig  # noqa: E402
from hylo_jax.models.hybrid import ModelSpec  # noqa: E402
from hylo_jax.sharding import make_mesh, place  # noqa: E402


def inference_spec(spec: ModelSpec) -> ModelSpec:
    """The same model in bf16 parameters and compute, no remat."""
    return ModelSpec.create(replace_config(spec.model, dtype="bfloat16", param_dtype="bfloat16", remat="none"),
                            spec.hybrid)


def measure(engine: Engine, context: int, decode_steps: int) -> dict:
    """Prefill one random prompt of `context` tokens, then decode `decode_steps` greedy tokens."""
    with engine.on_mesh():
        return _measure(engine, context, decode_steps)


def _measure(engine: Engine, context: int, decode_steps: int) -> dict:
    prompt = np.random.default_rng(0).integers(0, 1000, context).tolist()
    stamps = []

    def progress(done: int) -> None:
        stamps.append((done, time.time()))
        if len(stamps) % 32 == 0:  # a long prompt shows its pace (and a cut run how far it got)
            print(f"  prefilled {done} tokens, {stamps[-1][1] - stamps[0][1]:.1f} s after the first chunk",
                  file=sys.stderr, flush=True)

    pre = engine.prefill([prompt], context + decode_steps, progress=progress)
    if len(stamps) > 1:
        (t0_tokens, t0), (t1_tokens, t1) = stamps[0], stamps[-1]
        prefill_tps = (t1_tokens - t0_tokens) / (t1 - t0)
    else:
        prefill_tps = float("nan")  # one chunk: its time is mostly compilation
    sampling = SamplingConfig(max_new_tokens=decode_steps)
    stop = jnp.asarray([-1], jnp.int32)
    args = (pre.caches, pre.last_logits, pre.lengths, stop)
    compiled = _decode.lower(engine.graphdef, engine.state, *args, sampling).compile()
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(engine.state, *args))
    decode_tps = decode_steps / (time.perf_counter() - t0)
    return {"prefill": prefill_tps, "decode": decode_tps}


def measure_at(engine: Engine, context: int, chunk: int, decode_steps: int) -> dict:
    """Prefill and decode rates at `context` on a filled cache of `context + decode_steps` slots."""
    with engine.on_mesh():
        return _measure_at(engine, context, chunk, decode_steps)


def _measure_at(engine: Engine, context: int, chunk: int, decode_steps: int) -> dict:
    caches = _randomize(_init_caches(engine.graphdef, engine.state, 1, context + decode_steps))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (1, chunk)), jnp.int32)
    lengths = jnp.asarray([context], jnp.int32)
    hidden = jnp.zeros((1, engine.hidden_size), jnp.float32)
    # chunk start -> seconds of its call. The first two calls at 0 may compile (the filled caches come with
    # the fill's shardings, the step returns its own), so only the third is kept.
    seconds = {}
    for start in (0, 0, 0, context - chunk):
        t0 = time.perf_counter()
        caches, hidden = _prefill_chunk(engine.graphdef, engine.state, caches, tokens, jnp.int32(start), lengths,
                                        hidden)
        jax.block_until_ready(hidden)
        seconds[start] = time.perf_counter() - t0
        print(f"  prefill chunk at {start}: {seconds[start]:.2f} s", file=sys.stderr, flush=True)
    prefill_s = context / chunk * (seconds[0] + seconds[context - chunk]) / 2
    args = (caches, _head(engine.graphdef, engine.state, hidden), lengths, jnp.asarray([-1], jnp.int32))
    sampling = SamplingConfig(max_new_tokens=decode_steps)
    compiled = _decode.lower(engine.graphdef, engine.state, *args, sampling).compile()
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(engine.state, *args))
    return {"prefill": context / prefill_s, "prefill_s": prefill_s,
            "decode": decode_steps / (time.perf_counter() - t0)}


def _randomize(caches):
    """Every floating-point cache entry overwritten in place, one array at a time, by bounded values that
    vary along every axis (a fill that needs no temporaries: a 64 GiB cache fits next to itself once)."""
    return jax.tree.map(lambda x: _filler(x.sharding)(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, caches)


@functools.cache
def _filler(sharding):
    """`_fill` in place on arrays of this sharding (the output keeps it: a sharded cache stays sharded)."""
    return jax.jit(_fill, donate_argnums=0, out_shardings=sharding)


def _fill(x: jax.Array) -> jax.Array:
    phase = sum(jax.lax.broadcasted_iota(jnp.float32, x.shape, axis) * (0.618 + axis) for axis in range(x.ndim))
    return jnp.cos(phase).astype(x.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--contexts", default=None, help="comma-separated prompt lengths")
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk (default 8192; 64 with --tiny)")
    parser.add_argument("--decode", type=int, default=64, help="decode steps timed per context")
    parser.add_argument("--full-prefill", type=int, default=None,
                        help="longest context prefilled whole (default 65536; 256 with --tiny)")
    parser.add_argument("--models", default="teacher,hybrid", help="comma list of teacher, hybrid")
    parser.add_argument("--tensor", type=int, default=1, help="GPUs for tensor parallelism (sharded caches)")
    parser.add_argument("--out", type=Path, default=None,
                        help="append rows here (JSON lines); the table and plot then cover every row in it")
    args = parser.parse_args()
    contexts = [int(c) for c in (args.contexts or ("256,1024" if args.tiny else
                                                   "8192,65536,262144,1048576,2097152")).split(",")]
    chunk = args.chunk or (64 if args.tiny else 8192)
    full_prefill = args.full_prefill or (256 if args.tiny else 65536)
    teacher_spec, student_spec = (inference_spec(s) for s in specs(args.tiny))
    rows = []
    models = {"teacher": ("Llama teacher", teacher_spec), "hybrid": ("HyLo hybrid", student_spec)}
    mesh = make_mesh(MeshConfig(fsdp=1, tensor=args.tensor), jax.devices()[:args.tensor]) if args.tensor > 1 else None
    for name, spec in (models[m] for m in args.models.split(",")):
        model = spec.build(nnx.Rngs(0))
        if mesh is not None:
            name = f"{name}, {args.tensor} GPUs TP"
            model = place(model, mesh)
        engine = Engine(model, EngineConfig(prefill_chunk=chunk), mesh)
        for context in contexts:
            cache_gib = engine.cache_bytes(1, context + args.decode) / 2**30
            how = "whole prompt" if context <= full_prefill else "2 chunks, filled cache"
            try:
                if context <= full_prefill:
                    m = measure(engine, context, args.decode)
                else:
                    m = measure_at(engine, context, chunk, args.decode)
                rows.append([name, context, how, cache_gib, m["prefill"], m.get("prefill_s", context / m["prefill"]),
                             m["decode"]])
            except Exception as e:  # running out of memory at long context is a result; anything else is a bug
                if "memory" not in str(e).lower() and "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                print(f"{name} T={context}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
                rows.append([name, context, how, cache_gib, "OOM", "-", "OOM"])
            print("row:", rows[-1], file=sys.stderr, flush=True)  # the table comes at the end; a cut run keeps these
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
        del engine
    if args.out:
        rows = [json.loads(line) for line in args.out.read_text().splitlines()]
    print(f"device: {jax.devices()[0].device_kind}; prefill chunk {chunk}; decode B=1, {args.decode} steps")
    print_table(["model", "context", "prefill measured on", "cache GiB", "prefill tok/s", "prefill s",
                 "decode tok/s"], rows)
    plot(rows, Path(__file__).with_name("inference.png") if not args.tiny else Path("/tmp/inference_tiny.png"))


def plot(rows: list, path: Path) -> None:
    """cache GiB, prefill and decode tokens/s vs context, one curve per model (OOM rows left out)."""
    curves = {}
    for name, context, _, cache_gib, prefill, _, decode in rows:
        if decode != "OOM":
            curves.setdefault(name, []).append((context, cache_gib, prefill, decode))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, points in curves.items():
        ctx, gib, pre, dec = (np.array(v, float) for v in zip(*points))
        for ax, y in zip(axes, (gib, pre, dec)):
            ax.plot(ctx, y, "o-", label=name)
    for ax, title in zip(axes, ("cache GiB", "prefill tokens/s", "decode tokens/s")):
        ax.set(xscale="log", xlabel="context (tokens)", title=title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
