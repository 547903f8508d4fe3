"""Zebra-Llama's sensitivity search for which layers become MLA.

Start from the all-linear student; for each layer i, swap layer i back to MLA (taken from the
all-MLA student, both upcycled from the same teacher) and measure the KL to the teacher on a
held-out batch. Layers whose swap lowers the KL most are the most attention-sensitive.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
from flax import nnx
from jaxtyping import Array, Int

from hylo_jax.convert.upcycle import upcycle
from hylo_jax.models.hybrid import HybridConfig, ModelSpec
from hylo_jax.models.transformer import CausalLM
from hylo_jax.sharding import path_keys
from hylo_jax.train.losses import forward_kl

log = logging.getLogger(__name__)


@jax.jit
def _kl(graphdef, state, teacher_logits, tokens):
    return forward_kl(teacher_logits, nnx.merge(graphdef, state)(tokens))


def _graphdef(spec: ModelSpec):
    return nnx.split(nnx.eval_shape(lambda: spec.build(nnx.Rngs(0))))[0]


def _layer_of(path: tuple) -> int | None:
    keys = path_keys(path)
    return int(keys[2]) if keys[:2] == ["model", "layers"] else None


def sensitivity_ranking(teacher: CausalLM, plan: HybridConfig, tokens: Int[Array, "b t"], *, seed: int = 0,
                        students: tuple[CausalLM, CausalLM] | None = None
                        ) -> tuple[float, list[tuple[int, float]]]:
    """(KL of the all-linear student, [(layer, KL with that layer as MLA)] best first).

    `students` = (all-MLA, all-linear), e.g. the Stage I (ILD) checkpoints as Zebra-Llama does;
    by default both are freshly upcycled from the teacher.
    """
    cfg = teacher.cfg
    everything = tuple(range(cfg.num_layers))
    linear_spec = ModelSpec.create(cfg, dataclasses.replace(plan, mla_layers=(), attention_layers=()))
    mla_spec = ModelSpec.create(cfg, dataclasses.replace(plan, mla_layers=everything, attention_layers=()))
    mla_model, linear_model = students or (upcycle(teacher, mla_spec, seed=seed),
                                           upcycle(teacher, linear_spec, seed=seed))
    linear_state = dict(nnx.to_flat_state(nnx.state(linear_model)))
    mla_state = dict(nnx.to_flat_state(nnx.state(mla_model)))
    teacher_logits = jax.jit(lambda t: teacher(t))(tokens)

    base = float(_kl(_graphdef(linear_spec), nnx.from_flat_state(linear_state), teacher_logits, tokens))
    log.info("all-linear student: KL %.4f", base)
    results = []
    for i in everything:
        spec = ModelSpec.create(cfg, dataclasses.replace(plan, mla_layers=(i,), attention_layers=()))
        flat = {p: v for p, v in linear_state.items() if _layer_of(p) != i}
        flat.update({p: v for p, v in mla_state.items() if _layer_of(p) == i})
        kl = float(_kl(_graphdef(spec), nnx.from_flat_state(flat), teacher_logits, tokens))
        log.info("layer %d as MLA: KL %.4f (%+.4f)", i, kl, kl - base)
        results.append((i, kl))
    return base, sorted(results, key=lambda r: r[1])
