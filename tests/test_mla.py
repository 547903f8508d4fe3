"""MLA against transformers' DeepseekV3Attention, a NumPy reference, and its own absorbed decode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import rel_err
from flax import nnx
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)

from hylo_jax.config import MeshConfig, RopeConfig
from hylo_jax.convert.hf import hf_name, load_params, rope_from_hf
from hylo_jax.convert.sources import StateDictSource
from hylo_jax.errors import ConfigError
from hylo_jax.kernels import attention as attention_module
from hylo_jax.models import mla as mla_module
from hylo_jax.models.mla import MLA, MLACache, MLAConfig, mla_cache_bytes_per_token
from hylo_jax.models.transformer import segment_positions
from hylo_jax.sharding import make_mesh, path_str, state_shardings

DIMS = dict(hidden_size=64, num_heads=4, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8,
            v_head_dim=10)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
            mscale=1.0, mscale_all_dim=0.8)
# DeepSeek: one up-projection head per query head, latent norms, YaRN. HyLo: GQA-style kv heads.
VARIANTS = {
    "deepseek": MLAConfig(**DIMS, num_kv_heads=4, q_lora_rank=24, latent_norm=True,
                          rope=rope_from_hf(YARN)),
    "hylo": MLAConfig(**DIMS, num_kv_heads=2, q_lora_rank=0, latent_norm=False,
                      rope=RopeConfig(theta=500.0)),
}


def hidden(batch=2, length=11, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, length, 64)).astype(np.float32)


def arange_positions(batch, length):
    return jnp.broadcast_to(jnp.arange(length), (batch, length))


def torch_reference(q_lora_rank, rope_parameters, seed=0):
    """A DeepseekV3Attention (eager, non-interleaved RoPE) with random weights, and its config."""
    hf = transformers.DeepseekV3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
        kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
        max_position_embeddings=64, rope_interleave=False, rope_parameters=rope_parameters,
        attention_bias=False)
    hf._attn_implementation = "eager"
    torch.manual_seed(seed)
    ref = DeepseekV3Attention(hf, layer_idx=0).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.normal_(0.0, 0.15)
            if "norm" in n:
                p.add_(1.0)
    return ref, hf


def torch_forward(ref, hf, x: np.ndarray) -> torch.Tensor:
    b, t, _ = x.shape
    xt = torch.tensor(x)
    cos_sin = DeepseekV3RotaryEmbedding(hf)(xt, torch.arange(t)[None].expand(b, t))
    mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]
    return ref(xt, position_embeddings=cos_sin, attention_mask=mask)[0]


def abstract_mla(cfg: MLAConfig):
    return nnx.split(nnx.eval_shape(lambda: MLA(cfg, rngs=nnx.Rngs(0))))


def from_torch(cfg: MLAConfig, ref) -> MLA:
    """Our MLA with `ref`'s weights, through the generic HF import (rename + transpose)."""
    graphdef, abstract = abstract_mla(cfg)
    mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    shardings = state_shardings(abstract, mesh)
    params = load_params(abstract, StateDictSource(ref.state_dict()), shardings)
    return nnx.merge(graphdef, params)


def random_mla(cfg: MLAConfig, seed=0) -> MLA:
    """An MLA with N(0, 0.15) weights and norm scales around 1."""
    graphdef, abstract = abstract_mla(cfg)
    rng = np.random.default_rng(seed)
    params = {}
    for path, var in nnx.to_flat_state(abstract):
        value = rng.normal(0.0, 0.15, var.shape) + path_str(path).endswith("scale")
        params[path] = var.replace(value=jnp.asarray(value, jnp.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(params))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, x, positions, segment_ids):
    return nnx.merge(graphdef, params)(x, positions=positions, segment_ids=segment_ids)[0]


def forward(model: MLA, x, positions=None, segment_ids=None) -> jax.Array:
    """The jitted training/prefill path (positions 0..t-1 unless given)."""
    x = jnp.asarray(x)
    positions = arange_positions(*x.shape[:2]) if positions is None else positions
    return _forward(*nnx.split(model), x, positions, segment_ids)


@pytest.mark.parametrize("q_lora", [24, 0], ids=["q_lora", "q_proj"])
@pytest.mark.parametrize("rope", ["default", "yarn"])
def test_matches_deepseek_v3_attention(q_lora, rope):
    rope_parameters = YARN if rope == "yarn" else dict(rope_type="default", rope_theta=10000.0)
    ref, hf = torch_reference(q_lora or None, rope_parameters)
    cfg = MLAConfig(**DIMS, num_kv_heads=4, q_lora_rank=q_lora, latent_norm=True,
                    rms_norm_eps=1e-6, rope=rope_from_hf(hf.rope_parameters))
    model = from_torch(cfg, ref)
    x = hidden()
    with torch.no_grad():
        want = torch_forward(ref, hf, x).numpy()
    assert rel_err(forward(model, x), want) <= 1e-5


def test_param_names_are_deepseek_v3_names():
    for q_lora in (24, 0):
        ref, _ = torch_reference(q_lora or None, dict(rope_type="default", rope_theta=10000.0))
        cfg = MLAConfig(**DIMS, num_kv_heads=4, q_lora_rank=q_lora, latent_norm=True)
        _, params = abstract_mla(cfg)
        mapped = {hf_name(path_str(p))[0]: v.shape for p, v in nnx.to_flat_state(params)}
        assert mapped == {k: tuple(v.shape[::-1]) for k, v in ref.state_dict().items()}


def test_gradients_match_torch_autograd():
    ref, hf = torch_reference(24, YARN)
    cfg = MLAConfig(**DIMS, num_kv_heads=4, q_lora_rank=24, latent_norm=True,
                    rope=rope_from_hf(hf.rope_parameters))
    model = from_torch(cfg, ref)
    x = hidden(2, 9)
    w = np.random.default_rng(5).normal(size=(2, 9, 64)).astype(np.float32)
    ref.zero_grad()
    (torch_forward(ref, hf, x) * torch.tensor(w)).sum().backward()
    want = {n: p.grad.numpy() for n, p in ref.named_parameters()}

    graphdef, params = nnx.split(model)

    def loss(p):
        y, _ = nnx.merge(graphdef, p)(jnp.asarray(x), positions=arange_positions(2, 9))
        return jnp.sum(y * w)

    grads = nnx.to_flat_state(jax.jit(jax.grad(loss))(params))
    assert len(grads) == len(want)
    for path, g in grads:
        name, layout = hf_name(path_str(path))
        assert rel_err(g.get_value(), layout(want[name])) <= 1e-4, name


def numpy_mla(model: MLA, x: np.ndarray) -> np.ndarray:
    """Decompressed MLA in float64 NumPy: default RoPE, no latent norms, kv heads repeated."""
    cfg = model.cfg
    p = {path_str(k): np.asarray(v.get_value(), np.float64)
         for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    b, t, _ = x.shape
    h, g, dn, dr, r = (cfg.num_heads, cfg.num_kv_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                       cfg.kv_lora_rank)
    q = x @ p["q_a_proj.kernel"] @ p["q_b_proj.kernel"] if cfg.q_lora_rank else (
        x @ p["q_proj.kernel"])
    q = q.reshape(b, t, h, dn + dr)
    ckv = x @ p["kv_a_proj_with_mqa.kernel"]
    c, k_rope = ckv[..., :r], ckv[..., r:]

    angles = np.arange(t)[:, None] * cfg.rope.theta ** (-np.arange(0, dr, 2) / dr)
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]

    def rope(z):  # pairs (i, i + dr/2)
        z1, z2 = z[..., :dr // 2], z[..., dr // 2:]
        return np.concatenate([z1 * cos - z2 * sin, z2 * cos + z1 * sin], -1)

    q = np.concatenate([q[..., :dn], rope(q[..., dn:])], -1)
    kv = (c @ p["kv_b_proj.kernel"]).reshape(b, t, g, dn + cfg.v_head_dim)
    kv = np.repeat(kv, h // g, axis=2)  # query head i reads kv head i // (h / g)
    k_rot = np.broadcast_to(rope(k_rope[:, :, None, :]), (b, t, h, dr))
    k, v = np.concatenate([kv[..., :dn], k_rot], -1), kv[..., dn:]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(dn + dr)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1)
    return out @ p["o_proj.kernel"]


@pytest.mark.parametrize("q_lora", [0, 20])
def test_hylo_variant_matches_numpy(q_lora):
    cfg = MLAConfig(**DIMS, num_kv_heads=2, q_lora_rank=q_lora, latent_norm=False,
                    rope=RopeConfig(theta=500.0))
    model = random_mla(cfg, seed=1)
    x = hidden(2, 13, seed=3)
    got = forward(model, x)
    assert model.kv_a_layernorm is None and model.kv_b_proj.kernel.shape == (16, 2 * (12 + 10))
    assert rel_err(got, numpy_mla(model, x.astype(np.float64))) <= 1e-5


def cached_run(model: MLA, x, chunk: int, prefill: int, max_len: int = 16):
    """Feeds x through the cache path: `prefill` tokens at once, then chunks of `chunk` (jitted)."""
    graphdef, params = nnx.split(model)

    @jax.jit
    def step(params, x, positions, cache, kv_length):
        return nnx.merge(graphdef, params)(x, positions=positions, cache=cache, kv_length=kv_length)

    b, t, _ = x.shape
    cache = MLACache.zeros(b, max_len, model.cfg)
    bounds = [0, prefill, *range(prefill + chunk, t, chunk), t]
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        positions = jnp.broadcast_to(jnp.arange(start, end), (b, end - start))
        y, cache = step(params, x[:, start:end], positions, cache, jnp.full((b,), end))
        outs.append(y)
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("prefill,chunk", [(7, 1), (3, 3)], ids=["decode", "chunked"])
@pytest.mark.parametrize("decompress_from", [64, 1], ids=["absorbed", "decompressed-blocks"])
def test_cache_paths_equal_full_forward(monkeypatch, variant, prefill, chunk, decompress_from):
    """Latent-cache calls equal the full forward, attending in latent space (absorbed) or on cache
    blocks decompressed as they are visited."""
    monkeypatch.setattr(mla_module, "DECOMPRESS_MIN_QUERIES", decompress_from)
    monkeypatch.setattr(attention_module, "CACHE_BLOCK", 4)  # the cache is visited in 4 steps of 4 slots
    monkeypatch.setattr(attention_module, "SCORES_BYTES", 1)
    cfg = VARIANTS[variant]
    model = random_mla(cfg, seed=2)
    x = jnp.asarray(hidden(2, 12, seed=4))
    want = forward(model, x)
    got, cache = cached_run(model, x, chunk, prefill)
    assert cache.latent.shape == (2, 16, 16 + 8)
    assert not np.any(np.asarray(cache.latent[:, 12:]))
    assert rel_err(got, want) <= 1e-5


def test_flash_decode_kernel_equals_full_forward():
    """decode_impl="pallas" (the flash-decode kernel, interpret mode) on single-token steps = the full
    forward; 16 heads in 2 kv groups, a 64-slot cache in one split."""
    cfg = MLAConfig(**{**DIMS, "num_heads": 16, "qk_rope_head_dim": 16}, num_kv_heads=2, q_lora_rank=0,
                    latent_norm=False, rope=RopeConfig(theta=500.0), decode_impl="pallas")
    model = random_mla(cfg, seed=5)
    x = jnp.asarray(hidden(2, 12, seed=6))
    assert mla_module._decode_kernel_takes(16, cfg, 64)
    got, _ = cached_run(model, x, chunk=1, prefill=5, max_len=64)
    assert rel_err(got, forward(model, x)) <= 1e-5


def test_cache_size():
    cfg = VARIANTS["deepseek"]
    assert mla_cache_bytes_per_token(cfg, 2) == (16 + 8) * 2
    assert MLACache.zeros(3, 5, cfg).latent.shape == (3, 5, 24)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_sequences_equal_separate_documents(variant):
    model = random_mla(VARIANTS[variant], seed=3)
    docs = [hidden(1, n, seed=n)[0] for n in (5, 9, 3)]
    seg = jnp.asarray(np.concatenate([np.full(len(d), i) for i, d in enumerate(docs)])[None])
    got = forward(model, np.concatenate(docs)[None], segment_positions(seg), seg)
    want = np.concatenate([forward(model, d[None])[0] for d in docs])
    assert rel_err(got[0], want) <= 1e-5


@pytest.mark.parametrize("change,message", [
    (dict(num_heads=6), "num_heads=6 is not a multiple of mla.num_kv_heads=4"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7 must be even"),
    (dict(kv_lora_rank=0), "kv_lora_rank must be positive"),
    (dict(q_lora_rank=-2), "q_lora_rank must be positive or 0"),
    (dict(v_head_dim=32), "v_head_dim=32 exceeds"),
])
def test_bad_configs_raise(change, message):
    with pytest.raises(ConfigError, match=message):
        MLAConfig(**{**DIMS, "num_kv_heads": 4, **change})
