"""Tests of hylo_jax.models.gated_deltanet: the whole mixer vs transformers' Qwen3.5 / Qwen3-Next Gated DeltaNet,
chunked vs reference kernels, cached prefill + decode, packed documents, config validation."""

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import rel_err
from flax import nnx
from transformers.models.qwen3_5 import modeling_qwen3_5
from transformers.models.qwen3_next import modeling_qwen3_next

from hylo_jax.config import MeshConfig, from_dict
from hylo_jax.errors import ConfigError, MeshError
from hylo_jax.models.gated_deltanet import GatedDeltaNet, GDNCache, GDNConfig, check_mesh
from hylo_jax.sharding import make_mesh, state_shardings

H, DK, DV, D = 2, 8, 16, 32
CFG = GDNConfig(hidden_size=D, num_heads=H, head_k_dim=DK, expand_v=DV / DK, chunk_size=16)
TORCH = {  # name -> (modeling module, config class, mixer class)
    "qwen3_5": (modeling_qwen3_5, transformers.Qwen3_5TextConfig, "Qwen3_5GatedDeltaNet"),
    "qwen3_next": (modeling_qwen3_next, transformers.Qwen3NextConfig, "Qwen3NextGatedDeltaNet"),
}


def get(module, path: str):
    return functools.reduce(getattr, path.split("."), module)


def make_model(cfg: GDNConfig = CFG, seed: int = 0) -> GatedDeltaNet:
    """Our mixer with non-trivial norm scale and moderate decays."""
    model = GatedDeltaNet(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    model.o_norm.scale.set_value(jnp.asarray(1 + 0.2 * rng.standard_normal(cfg.head_v_dim), jnp.float32))
    model.A_log.set_value(jnp.asarray(np.log(rng.uniform(0.1, 1.0, cfg.num_heads)), jnp.float32))
    return model


def from_torch(kind: str, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our parameters (or gradients) from the transformers mixer's, num_k_heads == num_v_heads == H.

    qwen3_5: in_proj_qkv = [q; k; v] rows, in_proj_z, in_proj_b, in_proj_a.
    qwen3_next: in_proj_qkvz rows grouped per head [q_h; k_h; v_h; z_h], in_proj_ba per head [b_h; a_h].
    Both: conv1d.weight [2 H dk + H dv, 1, K] over the concatenated [q; k; v] channels.
    """
    kd = H * DK
    if kind == "qwen3_5":
        qkv = t["in_proj_qkv.weight"]
        q, k, v = qkv[:kd], qkv[kd:2 * kd], qkv[2 * kd:]
        z, b, a = t["in_proj_z.weight"], t["in_proj_b.weight"], t["in_proj_a.weight"]
    else:
        qkvz = t["in_proj_qkvz.weight"].reshape(H, 2 * DK + 2 * DV, D)
        q, k, v, z = (x.reshape(-1, D) for x in np.split(qkvz, [DK, 2 * DK, 2 * DK + DV], axis=1))
        ba = t["in_proj_ba.weight"].reshape(H, 2, D)
        b, a = ba[:, 0], ba[:, 1]
    conv = t["conv1d.weight"][:, 0].T  # [K, channels]
    return {"q_proj.kernel": q.T, "k_proj.kernel": k.T, "v_proj.kernel": v.T, "g_proj.kernel": z.T,
            "b_proj.kernel": b.T, "a_proj.kernel": a.T, "q_conv1d.kernel": conv[:, :kd],
            "k_conv1d.kernel": conv[:, kd:2 * kd], "v_conv1d.kernel": conv[:, 2 * kd:],
            "A_log": t["A_log"], "dt_bias": t["dt_bias"], "o_norm.scale": t["norm.weight"],
            "o_proj.kernel": t["out_proj.weight"].T}


@functools.partial(jax.jit, static_argnums=0)
def _loss_and_grads(graphdef, params, x, w, segment_ids):
    def loss(params, x):
        y, _ = nnx.merge(graphdef, params)(x, positions=None, segment_ids=segment_ids)
        return jnp.sum(y * w), y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, grads


def loss_and_grads(model: GatedDeltaNet, x, w, segment_ids=None):
    """y, d sum(y * w) / d params (as a module) and / d x."""
    graphdef, params = nnx.split(model)
    y, (g_params, g_x) = _loss_and_grads(graphdef, params, x, w, segment_ids)
    return y, nnx.merge(graphdef, g_params), g_x


@pytest.mark.parametrize("kind", sorted(TORCH))
def test_matches_transformers(kind, monkeypatch):
    module, config_cls, mixer = TORCH[kind]
    # Run the plain PyTorch functions even where fla / causal-conv1d / hub kernels could be dispatched to.
    for name in ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn"):
        monkeypatch.setattr(module, name, inspect.unwrap(getattr(module, name)))
    hf_cfg = config_cls(hidden_size=D, linear_num_key_heads=H, linear_num_value_heads=H, linear_key_head_dim=DK,
                        linear_value_head_dim=DV, linear_conv_kernel_dim=4, rms_norm_eps=1e-6, hidden_act="silu",
                        num_hidden_layers=1, layer_types=["linear_attention"])
    torch.manual_seed(0)
    ref = getattr(module, mixer)(hf_cfg, layer_idx=0)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            p.normal_(0.0, 0.3 if "conv" not in n else 0.5)
        ref.norm.weight.add_(1.0)
        ref.A_log.copy_(torch.log(torch.empty(H).uniform_(0.1, 1.0)))
    model = make_model()
    for path, value in from_torch(kind, {n: p.detach().numpy() for n, p in ref.named_parameters()}).items():
        assert get(model, path).shape == value.shape, path
        get(model, path).set_value(jnp.asarray(value))

    rng = np.random.default_rng(1)
    x, w = (rng.standard_normal((2, 45, D)).astype(np.float32) for _ in range(2))
    x_t = torch.from_numpy(x).requires_grad_(True)
    y_t = ref(x_t)
    (y_t * torch.from_numpy(w)).sum().backward()
    y, g_model, g_x = loss_and_grads(model, jnp.asarray(x), jnp.asarray(w))

    assert rel_err(y, y_t.detach().numpy()) <= 1e-5
    assert rel_err(g_x, x_t.grad.numpy()) <= 1e-4
    for path, g_ref in from_torch(kind, {n: p.grad.numpy() for n, p in ref.named_parameters()}).items():
        assert rel_err(get(g_model, path), g_ref) <= 1e-4, path


def test_chunked_matches_reference():
    rng = np.random.default_rng(2)
    x, w = (jnp.asarray(rng.standard_normal((2, 50, D)), jnp.float32) for _ in range(2))
    segment_ids = jnp.asarray(np.stack([np.repeat([0, 1, 2], [20, 7, 23]), np.repeat([0, 1], [30, 20])]))
    chunked = loss_and_grads(make_model(), x, w, segment_ids)
    reference = loss_and_grads(make_model(dataclasses.replace(CFG, impl="reference")), x, w, segment_ids)
    assert rel_err(chunked[0], reference[0]) <= 1e-5
    assert rel_err(chunked[2], reference[2]) <= 1e-4
    for path, g in nnx.to_flat_state(nnx.state(chunked[1])):
        assert rel_err(g.get_value(), get(reference[1], ".".join(map(str, path))).get_value()) <= 1e-4, path


@pytest.fixture(scope="module")
def forward():
    """A jitted functional call (split / merge) of one mixer: (x, cache, segment_ids) -> (y, cache)."""
    graphdef, params = nnx.split(make_model())

    @jax.jit
    def f(x, cache=None, segment_ids=None):
        return nnx.merge(graphdef, params)(x, positions=None, segment_ids=segment_ids, cache=cache)

    return f


def run_pieces(f, x, cuts, segment_ids=None):
    """Runs x in pieces cut at `cuts` with a cache; returns (concatenated y, final cache)."""
    cache = GDNCache.zeros(x.shape[0], CFG)
    ys = []
    for lo, hi in zip([0, *cuts], [*cuts, x.shape[1]]):
        y, cache = f(x[:, lo:hi], cache, None if segment_ids is None else segment_ids[:, lo:hi])
        ys.append(y)
    return jnp.concatenate(ys, axis=1), cache


# Piece lengths are kept to a few values (32, 8, 1) to bound compilations.
def test_prefill_then_decode_matches_full_forward(forward):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 40, D)), jnp.float32)
    y_full, cache_full = forward(x, GDNCache.zeros(2, CFG))
    for cuts in (range(32, 40), [8, 9, 17, 25, 26, 34, 35, 36, 37, 38, 39]):  # prefill + 8 decode steps; pieces
        y, cache = run_pieces(forward, x, list(cuts))
        assert rel_err(y, y_full) <= 1e-5, cuts
        for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(cache_full)):
            assert rel_err(a, b) <= 1e-5, cuts


def test_packed_documents_match_separate(forward):
    lengths = [5, 11, 14, 5]  # documents start at 0, 5, 16, 30
    x = jnp.asarray(np.random.default_rng(4).standard_normal((1, sum(lengths), D)), jnp.float32)
    segment_ids = jnp.asarray(np.repeat(np.arange(4), lengths))[None]
    # Each document alone, left-aligned in its own row (what follows it in the row cannot reach it).
    starts = np.cumsum([0, *lengths])
    rows = jnp.stack([jnp.pad(x[0, lo:hi], [(0, x.shape[1] - hi + lo), (0, 0)])
                      for lo, hi in zip(starts, starts[1:])])
    y_rows, _ = forward(rows)
    y_sep = jnp.concatenate([y_rows[i, :n] for i, n in enumerate(lengths)])[None]

    y_packed, _ = forward(x, None, segment_ids)
    assert rel_err(y_packed, y_sep) <= 1e-5
    # Packed prefill ending 2 tokens into the last document (shorter than the conv state, K - 1 = 3), then
    # decode continuing it; and pieces that cross document boundaries.
    for cuts in ([32, 33, 34], [8, 9, 17, 25, 33, 34]):
        y, _ = run_pieces(forward, x, cuts, segment_ids)
        assert rel_err(y, y_sep) <= 1e-5, cuts


def test_param_layout_and_sharding():
    cfg = GDNConfig(hidden_size=64)  # HyLo defaults: 6 heads, dk 256, dv 512
    model = nnx.eval_shape(lambda: GatedDeltaNet(cfg, rngs=nnx.Rngs(0)))
    shapes = {".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert shapes == {"q_proj.kernel": (64, 1536), "k_proj.kernel": (64, 1536), "v_proj.kernel": (64, 3072),
                      "a_proj.kernel": (64, 6), "b_proj.kernel": (64, 6), "g_proj.kernel": (64, 3072),
                      "q_conv1d.kernel": (4, 1536), "k_conv1d.kernel": (4, 1536), "v_conv1d.kernel": (4, 3072),
                      "A_log": (6,), "dt_bias": (6,), "o_norm.scale": (512,), "o_proj.kernel": (3072, 64)}
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    check_mesh(cfg, mesh)
    state_shardings(nnx.state(model), mesh)
    with pytest.raises(MeshError, match="gdn.num_heads=6"):
        check_mesh(cfg, make_mesh(MeshConfig(fsdp=2, tensor=4)))
    # fla-style initialisation: dt = softplus(dt_bias) in [dt_min, dt_max], A = exp(A_log) in [0, 16).
    real = GatedDeltaNet(CFG, rngs=nnx.Rngs(0))  # same shapes as other tests: no new eager compilations
    dt = jax.nn.softplus(real.dt_bias[...])
    assert bool(jnp.all((dt >= 0.999 * CFG.dt_min) & (dt <= 1.001 * CFG.dt_max)))
    assert bool(jnp.all(jnp.exp(real.A_log[...]) < 16))


@pytest.mark.parametrize("overrides, message", [
    (dict(num_heads=0), "gdn.num_heads must be positive"),
    (dict(head_k_dim=-8), "gdn.head_k_dim must be positive"),
    (dict(expand_v=0.7), "gdn.expand_v=0.7 times gdn.head_k_dim=256"),
    (dict(chunk_size=48), "gdn.chunk_size must be a positive power of two"),
    (dict(conv_kernel=0), "gdn.conv_kernel must be positive"),
    (dict(norm_eps=0.0), "gdn.norm_eps must be positive"),
    (dict(A_init_range=[16, 1]), "gdn.A_init_range"),
    (dict(dt_min=0.2), "dt_min <= dt_max"),
    (dict(impl="triton"), "impl"),
    (dict(heads=4), "unknown key"),
])
def test_bad_configs(overrides, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(GDNConfig, overrides, "gdn")
