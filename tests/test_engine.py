"""The inference engine: chunked prefill of ragged batches + jitted decode, on tiny fp32 hybrids.

Greedy engine output must be what the full (uncached) forward predicts at every generated token, for
rows of different lengths and several prefill chunk sizes; cache bytes follow info.py's formulas.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from test_upcycle import TINY_MLA, teacher_model

from hylo_jax.convert.upcycle import upcycle
from hylo_jax.errors import RequestError
from hylo_jax.infer.engine import Engine, EngineConfig
from hylo_jax.infer.sampling import SamplingConfig
from hylo_jax.info import cache_values_per_token, state_values_per_sequence
from hylo_jax.models.gated_deltanet import GDNConfig
from hylo_jax.models.hybrid import HybridConfig, ModelSpec

PLANS = {  # 3 layers: every mixer kind next to MLA
    "mla+attention+gdn": HybridConfig(mla_layers=(0,), attention_layers=(1,), mla=TINY_MLA,
                                      gdn=GDNConfig(num_heads=2, head_k_dim=16, chunk_size=4)),
    "mla+mamba2": HybridConfig(mla_layers=(1,), linear="mamba2", mla=TINY_MLA),
}
PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6, 5, 3], [5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6]]


def hybrid(plan: str):
    teacher = teacher_model(0, num_layers=3)
    return upcycle(teacher, ModelSpec.create(teacher.cfg, PLANS[plan]))


@pytest.mark.parametrize(("plan", "chunk"), [pytest.param("mla+attention+gdn", 4, marks=pytest.mark.slow),
                                             pytest.param("mla+mamba2", 3, marks=pytest.mark.slow),
                                             ("mla+mamba2", 16)])  # (30-60 s each on CI)
def test_greedy_engine_equals_full_forward(plan, chunk):
    """Each generated token is the argmax of the full forward over prompt + tokens so far."""
    model = hybrid(plan)
    outs = Engine(model, EngineConfig(prefill_chunk=chunk)).generate(PROMPTS, SamplingConfig(max_new_tokens=5))
    for prompt, out in zip(PROMPTS, outs):
        assert len(out) == 5
        seq = prompt + out
        predicted = np.argmax(np.asarray(model(jnp.asarray([seq[:-1]])))[0], axis=-1)
        assert list(predicted[len(prompt) - 1:]) == out


def test_stop_tokens_end_a_row_only():
    model = hybrid("mla+mamba2")
    engine = Engine(model, EngineConfig(prefill_chunk=8))
    free = engine.generate(PROMPTS[:2], SamplingConfig(max_new_tokens=4))
    stop = free[0][1]
    stopped = engine.generate(PROMPTS[:2], SamplingConfig(max_new_tokens=4), stop_tokens=[stop])
    for row, out in zip(free, stopped):
        assert out == (row[:row.index(stop)] if stop in row else row)


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_cache_bytes_follow_the_formula(plan):
    """Per token: MLA r_kv + d_rope per layer, teacher 2 H_kv d_head, 0 for linear layers; plus fixed states."""
    model = hybrid(plan)
    spec = ModelSpec.create(model.cfg, PLANS[plan])
    engine, itemsize = Engine(model), 4  # fp32 caches
    per_token = (engine.cache_bytes(2, 2048) - engine.cache_bytes(2, 1024)) / (2 * 1024 * itemsize)
    assert per_token == cache_values_per_token(spec)
    fixed = engine.cache_bytes(2, 1024) - 2 * 1024 * per_token * itemsize
    assert fixed == 2 * state_values_per_sequence(spec) * itemsize


def test_bad_requests():
    engine = Engine(hybrid("mla+mamba2"), EngineConfig(max_len=12))
    with pytest.raises(RequestError, match="no prompt may be empty"):
        engine.generate([[1, 2], []], SamplingConfig(max_new_tokens=2))
    with pytest.raises(RequestError, match="does not fit the engine's max_len=12"):
        engine.generate([list(range(11))], SamplingConfig(max_new_tokens=2))


def test_engine_on_a_tensor_parallel_mesh():
    """On a data x tensor mesh (parameters placed on it) the engine generates what it does unsharded, with the
    caches created sharded: attention KV heads and GDN state heads over tensor, rows over data."""
    import jax

    from hylo_jax.config import MeshConfig
    from hylo_jax.sharding import make_mesh, place

    model = hybrid("mla+attention+gdn")
    prompts = PROMPTS[:2]
    want = Engine(model, EngineConfig(prefill_chunk=4)).generate(prompts, SamplingConfig(max_new_tokens=5))
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    engine = Engine(place(model, mesh), EngineConfig(prefill_chunk=4), mesh)
    assert engine.generate(prompts, SamplingConfig(max_new_tokens=5)) == want
    mla, attention, gdn = engine.prefill(prompts, 16).caches
    assert tuple(attention.k.sharding.spec)[:3] == ("data", None, "tensor"), attention.k.sharding
    assert tuple(gdn.state.sharding.spec)[:2] == ("data", "tensor"), gdn.state.sharding
    assert tuple(mla.latent.sharding.spec) in {("data",), ("data", None), ("data", None, None)}, mla.latent.sharding
