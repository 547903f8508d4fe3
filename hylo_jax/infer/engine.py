"""Batched generation with compressed caches: chunked prefill, then one jitted decode loop.

Prompts of any lengths share a batch. Rows are right-padded; each prefill chunk tells the layers
how many of its tokens are real (`kv_length`): attention and MLA mask the slots past it, and the
recurrent layers (Mamba2, GDN) leave their states untouched on padding. A prompt of any length
goes through in chunks of `prefill_chunk` tokens, so nothing grows as T x T; attention over the
cache is blocked (see `kernels.attention.cached_attention`). Decoding runs inside one
`lax.while_loop`: one compile per (batch, cache size, sampling) and none per token.

With a `mesh` (parameters already placed on it, e.g. by `checkpoint.load_model` or `sharding.place`),
every call runs under `jax.set_mesh`: the caches are created sharded (batch rows over data/fsdp,
attention KV heads and recurrent-state heads over tensor; MLA latents, shared by all heads, over rows
only) and the layers' sharding constraints apply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from hylo_jax.config import doc, require_positive
from hylo_jax.errors import RequestError
from hylo_jax.infer.sampling import SamplingConfig, sample

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How prompts are prefilled and how large the caches are."""

    prefill_chunk: int = doc(2048, "Prompt tokens per prefill step (at most; shorter prompts take one step of the "
                                   "next power of two); peak activation memory scales with it.")
    max_len: int = doc(0, "Cache slots per row (prompt + new tokens); 0 = the longest prompt + max_new_tokens.")

    def __post_init__(self):
        require_positive(self, "engine.", ("prefill_chunk",))


@dataclasses.dataclass
class Prefilled:
    """Caches after the prompts, and what decoding starts from."""

    caches: list
    last_logits: Float[Array, "b v"]  # logits at each row's last prompt token
    lengths: Int[Array, "b"]  # prompt lengths = each row's next position
    seconds: float


class Engine:
    """Prefill + decode for one model (`CausalLM`), any mix of attention, MLA, Mamba2 and GDN layers."""

    def __init__(self, model: nnx.Module, cfg: EngineConfig = EngineConfig(),
                 mesh: jax.sharding.Mesh | None = None):
        self.cfg = cfg
        self.mesh = mesh
        self.graphdef, self.state = nnx.split(model)
        self.hidden_size = model.model.embed_tokens.embedding.shape[1]

    def cache_bytes(self, batch: int, max_len: int) -> int:
        """Bytes of the caches `generate` allocates for `batch` rows of `max_len` slots (from their shapes)."""
        shapes = jax.eval_shape(lambda s: nnx.merge(self.graphdef, s).init_cache(batch, max_len), self.state)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))

    def on_mesh(self) -> contextlib.AbstractContextManager:
        """`jax.set_mesh(mesh)` for the engine's calls (nothing without a mesh)."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def prefill(self, prompts: Sequence[Sequence[int]], max_len: int,
                progress: Callable[[int], None] | None = None) -> Prefilled:
        """Runs the prompts through the model chunk by chunk into fresh caches of `max_len` slots;
        `progress(tokens done)` is called after each chunk has finished on the device."""
        lengths = np.array([len(p) for p in prompts], np.int32)
        longest = int(lengths.max())
        # short prompts: one chunk of the next power of two (few distinct shapes to compile)
        chunk = min(self.cfg.prefill_chunk, 1 << max(4, (longest - 1).bit_length()))
        width = -(-longest // chunk) * chunk
        tokens = np.zeros((len(prompts), width), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
        t0 = time.perf_counter()
        with self.on_mesh():
            caches = _init_caches(self.graphdef, self.state, len(prompts), max_len)
            last_hidden = jnp.zeros((len(prompts), self.hidden_size), jnp.float32)
            lengths_dev = jnp.asarray(lengths)
            for start in range(0, longest, chunk):
                caches, last_hidden = _prefill_chunk(self.graphdef, self.state, caches, jnp.asarray(
                    tokens[:, start:start + chunk]), jnp.int32(start), lengths_dev, last_hidden)
                if progress is not None:
                    jax.block_until_ready(last_hidden)
                    progress(min(start + chunk, longest))
            last_logits = _head(self.graphdef, self.state, last_hidden)
        jax.block_until_ready(last_logits)
        return Prefilled(caches, last_logits, lengths_dev, time.perf_counter() - t0)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 stop_tokens: Sequence[int] = ()) -> list[list[int]]:
        """Continuations of each prompt (stop tokens excluded), greedy or sampled."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RequestError("generate needs at least one prompt, and no prompt may be empty")
        longest = max(len(p) for p in prompts)
        max_len = self.cfg.max_len or longest + sampling.max_new_tokens
        if longest + sampling.max_new_tokens > max_len:
            raise RequestError(f"a prompt of {longest} tokens + {sampling.max_new_tokens} new tokens does not fit "
                               f"the engine's max_len={max_len}")
        pre = self.prefill(prompts, max_len)
        t0 = time.perf_counter()
        with self.on_mesh():
            out, _ = _decode(self.graphdef, self.state, pre.caches, pre.last_logits, pre.lengths,
                             jnp.asarray(list(stop_tokens) or [-1], jnp.int32), sampling)
        out = np.asarray(out)
        log.info("prefill %d x %d tokens in %.2fs, decode %d steps in %.2fs (compiles included)",
                 len(prompts), longest, pre.seconds, out.shape[1], time.perf_counter() - t0)
        stops = set(stop_tokens)
        result = []
        for row in out.tolist():
            ends = [i for i, t in enumerate(row) if t in stops or t < 0]
            result.append(row[: ends[0]] if ends else row)
        return result


@functools.partial(jax.jit, static_argnames=("graphdef", "batch", "max_len"))
def _init_caches(graphdef, state, batch: int, max_len: int) -> list:
    return nnx.merge(graphdef, state).init_cache(batch, max_len)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("caches",))
def _prefill_chunk(graphdef, state, caches, tokens: Int[Array, "b c"], start: Int[Array, ""],
                   lengths: Int[Array, "b"], last_hidden: Float[Array, "b d"]):
    """One chunk of every row at positions start..start+c-1, the real ones being < lengths; returns the
    caches and, per row, the final hidden state of its last prompt token (kept from an earlier chunk
    when the row ended there)."""
    model = nnx.merge(graphdef, state)
    b, c = tokens.shape
    positions = start + jnp.broadcast_to(jnp.arange(c), (b, c))
    hidden, caches = model.model(tokens, positions, caches=caches, kv_length=jnp.minimum(lengths, start + c))
    last = lengths - 1 - start
    here = hidden[jnp.arange(b), jnp.clip(last, 0, c - 1)].astype(jnp.float32)
    return caches, jnp.where(((last >= 0) & (last < c))[:, None], here, last_hidden)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _head(graphdef, state, hidden: Float[Array, "b d"]) -> Float[Array, "b v"]:
    model = nnx.merge(graphdef, state)
    return model.logits(hidden[:, None].astype(model.model.embed_tokens.embedding.dtype))[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "cfg"), donate_argnames=("caches",))
def _decode(graphdef, state, caches, last_logits, lengths, stop, cfg: SamplingConfig
            ) -> tuple[Int[Array, "b n"], list]:
    """Samples up to max_new_tokens per row (-1 after a stop token), all rows in lockstep; returns them and
    the caches. The caches are donated and returned so that the loop updates them in place (a copy of a
    32 GiB teacher cache at 1M tokens would not fit)."""
    model = nnx.merge(graphdef, state)
    b = last_logits.shape[0]
    out = jnp.full((b, cfg.max_new_tokens), -1, jnp.int32)

    def body(carry):
        step, caches, logits, pos, done, out, key = carry
        key, sub = jax.random.split(key)
        token = jnp.where(done, -1, sample(logits, sub, cfg))
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, stop)
        logits, caches = model.forward_cached(jnp.maximum(token, 0)[:, None], caches, pos[:, None], pos + 1)
        return step + 1, caches, logits[:, 0], pos + 1, done, out, key

    def cond(carry):
        step, done = carry[0], carry[4]
        return (step < cfg.max_new_tokens) & ~jnp.all(done)

    carry = (0, caches, last_logits, lengths, jnp.zeros((b,), bool), out, jax.random.key(cfg.seed))
    final = jax.lax.while_loop(cond, body, carry)
    return final[5], final[1]
