"""The Flax teachers against transformers' PyTorch models, imported from disk (fp32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TEACHERS, rel_err
from flax import nnx

from hylo_jax.config import MeshConfig
from hylo_jax.convert.hf import load_hf_model
from hylo_jax.generate import SamplingConfig, generate
from hylo_jax.models.transformer import segment_positions
from hylo_jax.sharding import make_mesh

SINGLE = MeshConfig(fsdp=1)


def single_device_mesh():
    return make_mesh(SINGLE, jax.devices()[:1])


def tokens(batch=3, length=13, seed=0):
    return np.random.default_rng(seed).integers(0, 128, (batch, length))


@pytest.mark.parametrize("name", list(TEACHERS))
def test_logits_match_transformers(teacher_dirs, name):
    folder, ref = teacher_dirs[name]
    model, cfg = load_hf_model(folder, single_device_mesh())
    x = tokens()
    with torch.no_grad():
        want = ref(torch.tensor(x)).logits.numpy()
    got = np.asarray(model(jnp.asarray(x)))
    assert rel_err(got, want) <= 1e-5
    assert cfg.arch == ref.config.model_type


@pytest.mark.slow  # ~35 s on CI; the mixers' packed tests (MLA, GDN, Mamba2) run by default
def test_packed_sequences_equal_separate_documents(teacher_dirs):
    folder, _ = teacher_dirs["qwen3"]
    model, _ = load_hf_model(folder, single_device_mesh())
    docs = [tokens(1, 5, 1)[0], tokens(1, 9, 2)[0], tokens(1, 3, 3)[0]]
    packed = np.concatenate(docs)[None]
    seg = np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])[None]
    got = np.asarray(model(jnp.asarray(packed), segment_ids=jnp.asarray(seg)))[0]
    want = np.concatenate([np.asarray(model(jnp.asarray(d[None])))[0] for d in docs])
    assert rel_err(got, want) <= 1e-5
    np.testing.assert_array_equal(segment_positions(jnp.asarray(seg))[0],
                                  np.concatenate([np.arange(len(d)) for d in docs]))


@pytest.mark.parametrize("name", [pytest.param("llama3", marks=pytest.mark.slow), "qwen2"])  # (llama3: ~35 s on CI)
def test_gradients_match_torch_autograd(teacher_dirs, name):
    folder, ref = teacher_dirs[name]
    model, _ = load_hf_model(folder, single_device_mesh())
    x = tokens(2, 11)
    weights = np.random.default_rng(5).normal(size=(2, 11, 128)).astype(np.float32)

    ref.zero_grad()
    (ref(torch.tensor(x)).logits * torch.tensor(weights)).sum().backward()
    want = {n: p.grad.numpy() for n, p in ref.named_parameters()}

    def loss(m):
        return jnp.sum(m(jnp.asarray(x)) * weights)

    grads = nnx.grad(loss)(model)
    from hylo_jax.convert.hf import hf_name
    from hylo_jax.sharding import path_str

    checked = 0
    for path, g in nnx.to_flat_state(grads):
        name_, transform = hf_name(path_str(path))
        assert rel_err(transform(np.asarray(g.get_value())), want[name_]) <= 1e-4, name_
        checked += 1
    assert checked == len(want)


def test_sharded_forward_equals_single_device(teacher_dirs):
    folder, _ = teacher_dirs["llama3"]
    x = jnp.asarray(tokens(4, 16))
    single, _ = load_hf_model(folder, single_device_mesh())
    want = np.asarray(single(x))

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model, _ = load_hf_model(folder, mesh)
    q = model.model.layers[0].self_attn.q_proj.kernel.get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec(("fsdp", "sequence"), "tensor")
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    with jax.set_mesh(mesh):
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
        got = forward(state, xs)
    assert rel_err(got, want) <= 1e-5


def test_bf16_compute_is_close_to_fp32(teacher_dirs):
    folder, _ = teacher_dirs["qwen2"]
    x = jnp.asarray(tokens())
    fp32, _ = load_hf_model(folder, single_device_mesh())
    bf16, _ = load_hf_model(folder, single_device_mesh(), dtype="bfloat16", remat="full")
    assert rel_err(bf16(x), fp32(x)) < 5e-2


@pytest.mark.parametrize("remat", [pytest.param("full", marks=pytest.mark.slow),
                                   pytest.param("dots", marks=pytest.mark.slow), "save_attention_out"])
def test_remat_does_not_change_gradients(teacher_dirs, remat):
    folder, _ = teacher_dirs["llama_tied"]
    x = jnp.asarray(tokens(2, 8))
    plain, _ = load_hf_model(folder, single_device_mesh())
    remat_model, _ = load_hf_model(folder, single_device_mesh(), remat=remat)
    loss = lambda m: jnp.mean(m(x) ** 2)  # noqa: E731
    g1 = jax.tree.leaves(nnx.state(nnx.grad(loss)(plain)))
    g2 = jax.tree.leaves(nnx.state(nnx.grad(loss)(remat_model)))
    for a, b in zip(g1, g2):
        assert rel_err(b, a) <= 1e-5


@pytest.mark.slow  # ~1.5 min on the CI machine; the engine tests check cached decoding of the hybrids
def test_cached_greedy_generation_equals_full_forward(teacher_dirs):
    """Ragged prompts: the KV-cache decode loop gives the argmax of the full forward each step."""
    folder, _ = teacher_dirs["qwen3"]
    model, _ = load_hf_model(folder, single_device_mesh())
    prompts = [list(tokens(1, 7, 1)[0]), list(tokens(1, 3, 2)[0])]
    outs = generate(model, prompts, SamplingConfig(max_new_tokens=6))
    for prompt, out in zip(prompts, outs):
        seq = list(prompt)
        for _ in range(6):
            seq.append(int(np.argmax(np.asarray(model(jnp.asarray([seq])))[0, -1])))
        assert out == seq[len(prompt):]


def test_sampling_respects_top_k():
    from hylo_jax.generate import sample

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 256))
    picks = jax.vmap(lambda k: sample(logits, k, SamplingConfig(temperature=1.0, top_k=2)))(
        jax.random.split(jax.random.key(0), 8))
    assert set(np.unique(np.asarray(picks))) <= {0, 1}
    picks = sample(logits, jax.random.key(1), SamplingConfig(temperature=1.0, top_p=0.6))
    assert set(np.unique(np.asarray(picks))) <= {0, 1}
