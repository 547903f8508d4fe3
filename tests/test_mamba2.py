"""The Mamba2 mixer: vs transformers' PyTorch Mamba2Mixer, GQA-shaped == repeated standard weights,
chunked == reference, cached prefill/decode == full forward, packed == separate documents, configs."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err
from flax import nnx
from transformers import Mamba2Config as HFMamba2Config
from transformers.models.mamba2 import modeling_mamba2

from hylo_jax.convert.hf import hf_name
from hylo_jax.errors import ConfigError
from hylo_jax.models.mamba2 import Mamba2Cache, Mamba2Config, Mamba2Mixer
from hylo_jax.sharding import path_str

TINY = dict(hidden_size=32, num_heads=4, head_dim=16, d_state=16, chunk_size=8)
GQA = dict(hidden_size=32, num_heads=4, head_dim=8, d_state=8, n_groups=4, num_xb_heads=2,
           chunk_size=8)


@jax.jit
def _apply(graphdef, state, x, segment_ids, cache):
    return nnx.merge(graphdef, state)(x, positions=None, segment_ids=segment_ids, cache=cache)


def run(mixer, x, segment_ids=None, cache=None):
    return _apply(*nnx.split(mixer), x, segment_ids, cache)


@jax.jit
def _output_and_grads(graphdef, state, x, segment_ids, cotangent):
    """(y, (d state, d x)) of the loss sum(y * cotangent)."""

    def loss(state, x):
        y = nnx.merge(graphdef, state)(x, positions=None, segment_ids=segment_ids)[0]
        return jnp.sum(y * cotangent), y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)
    return y, grads


def output_and_grads(mixer, x, cotangent, segment_ids=None):
    return _output_and_grads(*nnx.split(mixer), x, segment_ids, cotangent)


def abstract(cfg: Mamba2Config) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state) of a mixer, without running its (slow to compile) init."""
    return nnx.split(nnx.eval_shape(lambda: Mamba2Mixer(cfg, rngs=nnx.Rngs(0))))


def make_mixer(seed=0, **fields) -> Mamba2Mixer:
    """A mixer with random parameters in Mamba2's usual ranges, non-trivial D, scale, conv bias."""
    rng = np.random.default_rng(seed)
    graphdef, state = abstract(Mamba2Config(**fields))

    def fill(path, var):
        name = path_str(path)
        if name == "A_log":
            value = np.log(rng.uniform(1, 16, var.shape))
        elif name == "dt_bias":
            value = rng.normal(-3.0, 1.0, var.shape)
        else:
            value = rng.normal(1.0 if name in ("D", "norm.scale") else 0.0, 0.2, var.shape)
        return var.replace(value=jnp.asarray(value, var.dtype))

    return nnx.merge(graphdef, jax.tree.map_with_path(
        fill, state, is_leaf=lambda v: isinstance(v, nnx.Variable)))


def inputs(seed, b, t, d=32):
    return jax.random.normal(jax.random.key(seed), (b, t, d))


# --- vs transformers ----------------------------------------------------------------------------

def torch_mixer(n_groups, seed=0):
    """transformers' Mamba2Mixer with random weights (plain PyTorch path on CPU)."""
    assert importlib.util.find_spec("mamba_ssm") is None, "mamba_ssm would replace the torch path"
    assert importlib.util.find_spec("causal_conv1d") is None
    cfg = HFMamba2Config(hidden_size=32, num_heads=4, head_dim=16, state_size=16, expand=2,
                         n_groups=n_groups, chunk_size=8, conv_kernel=4, num_hidden_layers=1,
                         layer_norm_epsilon=1e-5)
    torch.manual_seed(seed)
    mixer = modeling_mamba2.Mamba2Mixer(cfg, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            if name == "A_log":
                p.copy_(torch.log(torch.empty_like(p).uniform_(1, 16)))
            elif name == "dt_bias":
                p.normal_(-3.0, 1.0)
            else:
                p.normal_(1.0 if name == "norm.weight" else 0.0, 0.2)
    return mixer


def load_from_torch(split: tuple[nnx.GraphDef, nnx.State], sd: dict) -> Mamba2Mixer:
    """Fills our mixer by the generic HF rename (conv1d.weight [C, 1, K] included)."""
    graphdef, state = split
    flat = dict(nnx.to_flat_state(state))
    used = set()
    for path, var in flat.items():
        name, transform = hf_name(path_str(path))
        flat[path] = var.replace(value=jnp.asarray(transform(sd[name].detach().numpy())))
        used.add(name)
    assert used == set(sd), f"unmapped transformers tensors: {set(sd) - used}"
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.mark.parametrize("n_groups", [2, 1])
def test_matches_transformers(n_groups):
    tm = torch_mixer(n_groups)
    ours = load_from_torch(abstract(Mamba2Config(**TINY, n_groups=n_groups)),
                           dict(tm.named_parameters()))
    x = np.asarray(inputs(1, 2, 21))
    ct = np.asarray(inputs(2, 2, 21))
    xt = torch.tensor(x, requires_grad=True)
    yt = tm(xt, cache_params=None, attention_mask=None)
    (yt * torch.tensor(ct)).sum().backward()

    y, (g_state, g_x) = output_and_grads(ours, jnp.asarray(x), jnp.asarray(ct))
    assert rel_err(y, yt.detach().numpy()) <= 1e-5
    assert rel_err(g_x, xt.grad.numpy()) <= 1e-4
    torch_grads = dict(tm.named_parameters())
    for path, g in nnx.to_flat_state(g_state):
        name, transform = hf_name(path_str(path))
        want = transform(torch_grads[name].grad.numpy())
        assert rel_err(g.get_value(), want) <= 1e-4, name


# --- GQA-shaped == standard with repeated weights ---------------------------------------------

def standard_equivalent(gqa: Mamba2Mixer) -> Mamba2Mixer:
    """The standard mixer (n_groups = H) whose x and B projections and conv channels are the GQA
    mixer's, each x/B head repeated H / num_xb_heads times."""
    cfg = gqa.cfg
    std = make_mixer(**{**dataclasses.asdict(cfg), "num_xb_heads": 0})
    r, p, n, hx = cfg.num_heads // cfg.num_xb_heads, cfg.head_dim, cfg.d_state, cfg.num_xb_heads

    def expand(channels):  # [..., x ; B ; C] over the conv channels
        xs, B, C = jnp.split(channels, [hx * p, hx * (p + n)], -1)
        rep = lambda v, w: jnp.repeat(v.reshape(*v.shape[:-1], hx, w), r, -2).reshape(
            *v.shape[:-1], -1)
        return jnp.concatenate([rep(xs, p), rep(B, n), C], -1)

    k = gqa.in_proj.kernel[...]
    z, u, dt = jnp.split(k, [cfg.d_inner, cfg.d_inner + cfg.conv_channels], -1)
    std.in_proj.kernel[...] = jnp.concatenate([z, expand(u), dt], -1)
    std.conv1d.kernel[...] = expand(gqa.conv1d.kernel[...])
    std.conv1d.bias[...] = expand(gqa.conv1d.bias[...])
    for name in ("dt_bias", "A_log", "D"):
        getattr(std, name)[...] = getattr(gqa, name)[...]
    std.norm.scale[...] = gqa.norm.scale[...]
    std.out_proj.kernel[...] = gqa.out_proj.kernel[...]
    return std


def test_gqa_equals_repeated_standard():
    gqa = make_mixer(**GQA)
    assert gqa.in_proj.kernel.shape == (32, 32 + 2 * 8 + 2 * 8 + 4 * 8 + 4)  # z, x, B, C, dt
    std = standard_equivalent(gqa)
    x = inputs(3, 2, 21)
    assert rel_err(run(gqa, x)[0], run(std, x)[0]) <= 1e-5


# --- chunked == reference ---------------------------------------------------------------------

@pytest.mark.parametrize("fields", [dict(TINY, n_groups=2), GQA], ids=["standard", "gqa"])
def test_chunked_matches_reference(fields):
    chunked = make_mixer(**fields)
    reference = make_mixer(**fields, impl="reference")
    x, ct = inputs(4, 2, 21), inputs(5, 2, 21)
    seg = jnp.array([[0] * 9 + [1] * 12, [0] * 21])
    yc, gc = output_and_grads(chunked, x, ct, seg)
    yr, gr = output_and_grads(reference, x, ct, seg)
    assert rel_err(yc, yr) <= 1e-5
    for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gr)):
        assert rel_err(a, b) <= 1e-4


# --- cache: chunked prefill + decode == full forward ------------------------------------------

@pytest.mark.parametrize("fields", [dict(TINY, n_groups=2), GQA], ids=["standard", "gqa"])
def test_prefill_then_decode_matches_full(fields):
    mixer = make_mixer(**fields)
    x = inputs(6, 2, 21)
    full, _ = run(mixer, x)
    cache, outs, start = Mamba2Cache.zeros(2, mixer.cfg), [], 0
    for size in (8, 2, 8, 1, 1, 1):  # prefill pieces (one shorter than K-1), then decode
        y, cache = run(mixer, x[:, start:start + size], cache=cache)
        outs.append(y)
        start += size
    assert start == 21
    assert rel_err(jnp.concatenate(outs, 1), full) <= 1e-5


# --- packed sequences -------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [dict(TINY, n_groups=2), GQA], ids=["standard", "gqa"])
def test_packed_equals_separate(fields):
    mixer = make_mixer(**fields)
    lengths = [8, 1, 8, 2, 2]  # a one-token document and a last one shorter than the conv window
    x = inputs(7, 2, sum(lengths))
    seg = jnp.tile(jnp.repeat(jnp.arange(len(lengths)), jnp.array(lengths)), (2, 1))
    packed, packed_cache = run(mixer, x, seg, Mamba2Cache.zeros(2, mixer.cfg))
    bounds = np.cumsum([0] + lengths)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        alone, alone_cache = run(mixer, x[:, lo:hi], cache=Mamba2Cache.zeros(2, mixer.cfg))
        assert rel_err(packed[:, lo:hi], alone) <= 1e-5
    # the returned cache is the last document's, so decoding continues it alone
    for a, b in zip(jax.tree.leaves(packed_cache), jax.tree.leaves(alone_cache)):
        assert rel_err(a, b) <= 1e-5


# --- fresh init and configs -------------------------------------------------------------------

def test_fresh_init():
    cfg = Mamba2Config(**{**TINY, "num_heads": 64, "head_dim": 2})
    mixer = Mamba2Mixer(cfg, rngs=nnx.Rngs(0))
    A = np.exp(np.asarray(mixer.A_log[...]))
    dt = np.asarray(jax.nn.softplus(mixer.dt_bias[...]))
    assert A.min() >= 1 and A.max() <= 16 and A.std() > 1
    assert dt.min() >= cfg.dt_min * (1 - 1e-5) and dt.max() <= cfg.dt_max * (1 + 1e-5)
    np.testing.assert_array_equal(mixer.D[...], 1.0)
    assert mixer.conv1d.kernel.shape == (4, 64 * 2 + 2 * 16)


@pytest.mark.parametrize("fields,match", [
    (dict(n_groups=3), "num_heads=4 is not a multiple of mamba2.n_groups=3"),
    (dict(num_xb_heads=3, n_groups=4), "num_heads=4 is not a multiple of mamba2.num_xb_heads=3"),
    (dict(num_xb_heads=2, n_groups=2), "needs one C group per head: n_groups=2 != num_heads=4"),
    (dict(chunk_size=12), "chunk_size=12 is not a power of two"),
    (dict(norm_group_size=24), "norm_group_size=24 must be 0 or divide d_inner"),
    (dict(head_dim=0), "head_dim must be positive"),
    (dict(dt_min=0.5, dt_max=0.1), "dt_min <= dt_max"),
    (dict(A_init_range=(0.0, 16.0)), "A_init_range"),
])
def test_bad_configs(fields, match):
    with pytest.raises(ConfigError, match=match):
        Mamba2Config(**{**TINY, **fields})
