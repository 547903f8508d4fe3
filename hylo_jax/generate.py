"""`generate`: prompts -> continuations with the inference engine, in one call."""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from hylo_jax.infer.engine import Engine, EngineConfig
from hylo_jax.infer.sampling import SamplingConfig, sample

__all__ = ["SamplingConfig", "generate", "sample"]


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,
             stop_tokens: Sequence[int] = (), *, prefill_chunk: int = 2048,
             mesh: jax.sharding.Mesh | None = None) -> list[list[int]]:
    """Continuations of each prompt (stop tokens excluded), greedy or sampled; prompts may differ in length.
    `mesh`: the one the model's parameters are placed on (sharded caches, see `infer.engine`)."""
    engine = Engine(model, EngineConfig(prefill_chunk=prefill_chunk), mesh)
    return engine.generate(prompts, cfg, stop_tokens)
