"""Upcycling a teacher into a HyLo hybrid (`convert.upcycle`), on tiny fp32 models built in memory.

What is checked: the X-EcoMLA SVD factors (exact at full rank, Eckart-Young optimal below it) and the
energy rank rule; an MLA layer that reproduces its teacher layer exactly when RoPE is switched off;
the MambaInLlama Mamba2 layer as causal linear attention once decay, dt, D and the conv are made
trivial; the GDN block copies; Qwen3 q/k-norm folding and Qwen2 biases; a plan without replaced
layers (and an untied head from a tied teacher) giving the teacher's logits; the paper's parameter
count of HyLo-Llama-8MLA8GDN; the errors of bad plans; whole tiny hybrids (forward, grad; decode is in test_engine.py).
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_torch_teacher, rel_err
from flax import nnx

from hylo_jax.config import MeshConfig, ModelConfig, RopeConfig, from_dict
from hylo_jax.convert.hf import load_hf_model
from hylo_jax.convert.upcycle import attention_weights, energy_rank, init_mla, upcycle
from hylo_jax.errors import ConfigError
from hylo_jax.models.gated_deltanet import GatedDeltaNet, GDNConfig
from hylo_jax.models.hybrid import HybridConfig, ModelSpec
from hylo_jax.models.mamba2 import Mamba2Config, Mamba2Mixer
from hylo_jax.models.mla import MLA, MLAConfig
from hylo_jax.models.transformer import Attention, CausalLM
from hylo_jax.sharding import make_mesh, path_str

# The jitted helpers below run tiny models once or twice: XLA's CPU backend optimisations cost
# more compile time than they save (about 40% less compile time, same fp32 results).
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)

# A tiny Llama-like teacher: d=64, 4 query heads of width 16, 2 KV heads (GQA).
TINY = dict(arch="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
            rope=RopeConfig(theta=10000.0))
# MLA ranks that fit the tiny teacher's heads (qk_nope + qk_rope = v = head_dim = 16).
TINY_MLA = MLAConfig(q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
                     v_head_dim=16)


def teacher_model(seed: int = 0, **fields) -> CausalLM:
    """A random tiny teacher, filled from NumPy (no slow-to-compile jax.random init): kernels
    N(0, 1/fan_in), RMSNorm scales (q/k norms included) N(1, 0.2), embeddings and biases N(0, 0.5)."""
    cfg = ModelConfig(**{**TINY, **fields})
    graphdef, state = nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, var):
        leaf = path_str(path).rpartition(".")[2]
        if leaf == "scale":
            value = rng.normal(1.0, 0.2, var.shape)
        elif leaf == "kernel":
            value = rng.normal(0.0, var.shape[0] ** -0.5, var.shape)
        else:
            value = rng.normal(0.0, 0.5, var.shape)
        return var.replace(value=jnp.asarray(value, var.dtype))

    return nnx.merge(graphdef, jax.tree.map_with_path(
        fill, state, is_leaf=lambda v: isinstance(v, nnx.Variable)))


def zeros_module(factory):
    """A module built abstractly and filled with zeros (skips the jax.random init and its compiles)."""
    graphdef, state = nnx.split(nnx.eval_shape(factory))
    return nnx.merge(graphdef, jax.tree.map(
        lambda v: v.replace(value=jnp.asarray(np.zeros(v.shape, v.dtype))), state,
        is_leaf=lambda v: isinstance(v, nnx.Variable)))


def hidden(batch=2, length=11, d=64, seed=0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, length, d)), jnp.float32)


def tokens(batch=2, length=12, vocab=64, seed=0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


def params(module: nnx.Module) -> dict[str, np.ndarray]:
    """'path.to.leaf' -> value of every nnx.Param of `module`."""
    return {path_str(p): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def torch_layout(linear) -> np.ndarray:
    """A Linear's weight W [out, in] (PyTorch layout) in float64."""
    return np.asarray(linear.kernel[...], np.float64).T


def repeat_kv(w: np.ndarray, kv_heads: int, group: int) -> np.ndarray:
    """[kv_heads * dh, d] -> [kv_heads * group * dh, d]: KV head j serves query heads
    j * group ... (j + 1) * group - 1, like GQA's repeat_kv."""
    return np.repeat(w.reshape(kv_heads, -1, w.shape[-1]), group, axis=0).reshape(-1, w.shape[-1])


def silu(x):
    return x / (1.0 + np.exp(-x))


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _logits(graphdef, state, toks):
    return nnx.merge(graphdef, state)(toks)


def logits(model: CausalLM, toks) -> np.ndarray:
    return np.asarray(_logits(*nnx.split(model), toks))


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _mix(graphdef, state, x, positions):
    return nnx.merge(graphdef, state)(x, positions=positions, segment_ids=None)[0]


def mix(mixer: nnx.Module, x, positions) -> np.ndarray:
    """mixer(x, positions=positions, segment_ids=None)'s output (jitted: one compile, not one per op)."""
    return np.asarray(_mix(*nnx.split(mixer), x, positions))


# --- 1. SVD factors and the energy rank ---------------------------------------------------------

def mla_factors(mla: MLA) -> dict[str, np.ndarray]:
    """The MLA's projections in PyTorch layout (float64), split into their pieces."""
    cfg = mla.cfg
    r, g, dn = cfg.kv_lora_rank, cfg.num_kv_heads, cfg.qk_nope_head_dim
    kv_a = torch_layout(mla.kv_a_proj_with_mqa)  # [r + dr, d]: latent down-projection ; k_rope
    kv_b = torch_layout(mla.kv_b_proj).reshape(g, dn + cfg.v_head_dim, r)  # per kv head [k_nope ; v]
    return dict(q_a=torch_layout(mla.q_a_proj), q_b=torch_layout(mla.q_b_proj), down=kv_a[:r],
                k_rope=kv_a[r:], k_up=kv_b[:, :dn], v_up=kv_b[:, dn:])


def teacher_mla(d: int, heads: int, kv_heads: int, head_dim: int, q_rank: int, kv_rank: int,
                nope: int, rope: int, seed: int = 0):
    """(teacher weights w, MLA initialised from them by init_mla)."""
    teacher = teacher_model(seed, hidden_size=d, num_heads=heads, num_kv_heads=kv_heads,
                            head_dim=head_dim, num_layers=1)
    w = attention_weights(teacher.model.layers[0].self_attn)
    cfg = MLAConfig(hidden_size=d, num_heads=heads, num_kv_heads=kv_heads, q_lora_rank=q_rank,
                    kv_lora_rank=kv_rank, qk_nope_head_dim=nope, qk_rope_head_dim=rope,
                    v_head_dim=head_dim)
    mla = zeros_module(lambda: MLA(cfg, rngs=nnx.Rngs(0)))  # every parameter is overwritten
    init_mla(mla, w, head_dim)
    return {k: np.asarray(v, np.float64) for k, v in w.items()}, mla


# (d, heads, kv_heads, head_dim, nope, rope). GQA, d=48: W_Q and [W_K; W_V] taller than wide.
# MQA, d=64 (the shapes of the MLA layer test below): W_Q square, [W_K; W_V] wider than tall.
SHAPES = {"gqa_d48": (48, 4, 2, 16, 12, 4), "mqa_d64": (64, 4, 1, 16, 8, 8)}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_svd_full_rank_reconstructs_teacher(shape):
    d, h, g, dh, nope, rope = SHAPES[shape]
    q_rank, kv_rank = min(h * dh, d), min(2 * g * dh, d)
    w, mla = teacher_mla(d, h, g, dh, q_rank, kv_rank, nope, rope)
    f = mla_factors(mla)
    # Queries: q_b @ q_a is W_Q (each head's rows are [first nope ; last rope] = all of them).
    assert rel_err(f["q_b"] @ f["q_a"], w["q"]) <= 1e-5
    # Keys/values: the up-projections times the latent down-projection give W_K's nope rows and W_V.
    wk, wv = w["k"].reshape(g, dh, d), w["v"].reshape(g, dh, d)
    assert rel_err(f["k_up"] @ f["down"], wk[:, :nope]) <= 1e-5
    assert rel_err(f["v_up"] @ f["down"], wv) <= 1e-5
    # The shared rotary key is the KV-head mean of W_K's last rope rows (W_K's own rows for MQA).
    assert rel_err(f["k_rope"], wk[:, dh - rope:].mean(0)) <= 1e-5
    np.testing.assert_array_equal(torch_layout(mla.o_proj), w["o"])


@pytest.mark.parametrize("shape", list(SHAPES))
def test_svd_reduced_rank_is_eckart_young(shape):
    d, h, g, dh, _, _ = SHAPES[shape]
    nope = rope = dh // 2  # every row of W_Q lands in q_b, so the whole of W_Q is approximated
    q_rank, kv_rank = 20, 12
    w, mla = teacher_mla(d, h, g, dh, q_rank, kv_rank, nope, rope, seed=3)
    f = mla_factors(mla)

    s_q = np.linalg.svd(w["q"], compute_uv=False)
    err_q = np.sum((f["q_b"] @ f["q_a"] - w["q"]) ** 2)
    assert err_q == pytest.approx(np.sum(s_q[q_rank:] ** 2), rel=1e-4)

    # [W_K ; W_V]: the latent down-projection is S_r V_r^T (orthogonal rows of norms sigma_1..r).
    kv = np.concatenate([w["k"], w["v"]])
    s_kv = np.linalg.svd(kv, compute_uv=False)
    gram = f["down"] @ f["down"].T
    assert rel_err(gram, np.diag(s_kv[:kv_rank] ** 2)) <= 1e-5
    # The rank-r approximation of [W_K ; W_V]: kv_b gives W_K's nope rows and W_V; W_K's rope rows
    # (not stored: MLA has one shared rotary key) are their projection on the latent row space.
    # The assembled matrix has rank <= r, so reaching the Eckart-Young error proves it is the
    # truncated SVD (unique: the singular values are distinct).
    proj = np.linalg.pinv(f["down"]) @ f["down"]
    wk = w["k"].reshape(g, dh, d)
    k_hat = np.concatenate([f["k_up"] @ f["down"], wk[:, nope:] @ proj], axis=1).reshape(-1, d)
    v_hat = (f["v_up"] @ f["down"]).reshape(-1, d)
    err_kv = np.sum((np.concatenate([k_hat, v_hat]) - kv) ** 2)
    assert err_kv == pytest.approx(np.sum(s_kv[kv_rank:] ** 2), rel=1e-4)


def _energy_rank_reference(s, ratio, multiple):
    energy = np.cumsum(np.asarray(s, np.float64) ** 2)
    k = next(i + 1 for i, e in enumerate(energy) if e >= ratio * energy[-1])
    assert k == 1 or energy[k - 2] < ratio * energy[-1]  # smallest
    return min(math.ceil(k / multiple) * multiple, len(s))


def test_energy_rank():
    # sigma^2 = 40, 30, 20, 5, 3, 2 (sum 100): cumulative shares 0.4, 0.7, 0.9, 0.95, 0.98, 1.
    s = np.sqrt([40.0, 30.0, 20.0, 5.0, 3.0, 2.0])
    assert energy_rank(s, 0.35, multiple=1) == 1
    assert energy_rank(s, 0.75, multiple=1) == 3
    assert energy_rank(s, 0.96, multiple=1) == 5
    assert energy_rank(s, 1.0, multiple=1) == 6
    assert energy_rank(s, 0.75, multiple=2) == 4
    assert energy_rank(s, 0.35) == 6  # rounded up to 8, capped at the full rank 6
    s = np.asarray(jnp.linalg.svd(jax.random.normal(jax.random.key(0), (40, 64)), compute_uv=False))
    for ratio in (0.05, 0.3, 0.5, 0.8, 0.9, 0.99, 0.999, 1.0):
        for multiple in (1, 8):
            got = energy_rank(s, ratio, multiple)
            assert got == _energy_rank_reference(s, ratio, multiple), (ratio, multiple)
            assert got % multiple == 0 or got == len(s)
    assert energy_rank(s, 1.0) == 40


# --- 2. MLA at full rank, RoPE off, is the teacher's attention ----------------------------------

@pytest.mark.parametrize("variant", ["mqa", "gqa_shared_rope_rows"])
def test_mla_full_rank_reproduces_attention_without_rope(variant):
    """With positions = 0 (cos = 1, sin = 0; the causal mask comes from token order) both layers are
    RoPE-free and the full-rank MLA computes the teacher's scores q.k/sqrt(head_dim) exactly. That
    needs the shared k_rope (the KV-head mean of W_K's last rope rows) to be each KV head's own rows:
    true for an MQA teacher, or a GQA teacher whose KV heads share those rows.

    With RoPE on, the MLA layer is only an approximation of the teacher: its rope dims are rotated
    with frequencies of a qk_rope_head_dim-wide rotary embedding paired within those dims (the
    teacher rotates pairs (i, i + head_dim/2) of the whole head), the nope dims are not rotated at
    all, and (GQA) k_rope is averaged over the KV heads. Distillation closes that gap."""
    kv_heads = 1 if variant == "mqa" else 2
    teacher = teacher_model(0, num_kv_heads=kv_heads)
    dh, rope = 16, 8
    if variant != "mqa":
        k = teacher.model.layers[0].self_attn.k_proj.kernel  # [d, kv_heads * dh]
        rows = k[...][:, dh - rope:dh]
        k[...] = k[...].at[:, 2 * dh - rope:].set(rows)
    mla_cfg = MLAConfig(q_lora_rank=min(4 * dh, 64), kv_lora_rank=min(2 * kv_heads * dh, 64),
                        qk_nope_head_dim=dh - rope, qk_rope_head_dim=rope, v_head_dim=dh)
    spec = ModelSpec.create(teacher.cfg, HybridConfig(mla_layers=(0,), attention_layers=(1,),
                                                      mla=mla_cfg))
    student = upcycle(teacher, spec)
    assert isinstance(student.model.layers[0].self_attn, MLA)
    x = hidden()
    zeros = jnp.zeros(x.shape[:2], jnp.int32)
    want = mix(teacher.model.layers[0].self_attn, x, zeros)
    got = mix(student.model.layers[0].self_attn, x, zeros)
    err = rel_err(got, want)
    assert err <= 1e-5, err


# --- 3. Mamba2 from attention = causal linear attention -----------------------------------------

def test_mamba2_from_attention_is_causal_linear_attention():
    teacher = teacher_model(1)  # GQA: 4 heads, 2 KV heads
    spec = ModelSpec.create(teacher.cfg, HybridConfig(
        attention_layers=(1,), linear="mamba2", mamba2=Mamba2Config(chunk_size=4)))
    student = upcycle(teacher, spec, seed=2)
    mixer = student.model.layers[0].linear_attn
    assert isinstance(mixer, Mamba2Mixer)
    cfg = mixer.cfg
    h, g, p = 4, 2, 16
    assert (cfg.num_heads, cfg.num_xb_heads, cfg.head_dim, cfg.d_state, cfg.n_groups) == (h, g, p, p, h)

    # Make the SSM trivial: decay exp(dt * A) = exp(-exp(-30)) == 1.0 in fp32, dt = softplus(0 +
    # log(e - 1)) = 1 (dt rows of in_proj zeroed), D = 0, the conv the identity (last tap 1, bias 0).
    mixer.A_log[...] = jnp.full((h,), -30.0)
    mixer.dt_bias[...] = jnp.full((h,), math.log(math.e - 1.0))
    mixer.D[...] = jnp.zeros((h,))
    mixer.in_proj.kernel[...] = mixer.in_proj.kernel[...].at[:, -h:].set(0.0)
    kernel = np.zeros(mixer.conv1d.kernel.shape, np.float32)
    kernel[-1] = 1.0
    mixer.conv1d.kernel[...] = jnp.asarray(kernel)
    mixer.conv1d.bias[...] = jnp.zeros_like(mixer.conv1d.bias[...])
    mixer.norm.scale[...] = jnp.asarray(1 + 0.3 * np.random.default_rng(0).normal(size=h * p),
                                        jnp.float32)

    x = hidden(length=11, seed=4)
    got = mix(mixer, x, None)

    # y_t = sum_{s<=t} (C_t . B_s) x_s per head, with x = silu(W_V h), B = silu(W_K h) (KV heads
    # repeated to the query heads) and C = silu(W_Q h) from the teacher; then the gated RMSNorm
    # (groups of head_dim channels) with the fresh z rows of in_proj, and out_proj = W_O.
    w = {k: np.asarray(v, np.float64) for k, v in attention_weights(teacher.model.layers[0].self_attn).items()}
    hx = np.asarray(x, np.float64)
    b, t, _ = hx.shape
    xs = np.repeat(silu(hx @ w["v"].T).reshape(b, t, g, p), h // g, axis=2)
    B = np.repeat(silu(hx @ w["k"].T).reshape(b, t, g, p), h // g, axis=2)
    C = silu(hx @ w["q"].T).reshape(b, t, h, p)
    scores = np.einsum("bthn,bshn->bhts", C, B) * np.tril(np.ones((t, t)))
    y = np.einsum("bhts,bshp->bthp", scores, xs).reshape(b, t, h * p)
    z = hx @ np.asarray(mixer.in_proj.kernel[...], np.float64)[:, :h * p]
    gated = (y * silu(z)).reshape(b, t, h, p)
    gated = gated / np.sqrt(np.mean(gated ** 2, -1, keepdims=True) + cfg.norm_eps)
    want = (gated.reshape(b, t, h * p) * np.asarray(mixer.norm.scale[...], np.float64)) @ w["o"].T
    err = rel_err(got, want)
    assert err <= 1e-5, err


def test_mamba2_fresh_parts_are_kept():
    """Only x, B, C rows of in_proj and out_proj come from the teacher; z, dt, conv, A_log,
    dt_bias, D are the fresh student's (same seed)."""
    teacher = teacher_model(1)
    spec = ModelSpec.create(teacher.cfg, HybridConfig(attention_layers=(1,), linear="mamba2"))
    got = params(upcycle(teacher, spec, seed=5).model.layers[0].linear_attn)
    fresh = params(spec.build(nnx.Rngs(5)).model.layers[0].linear_attn)
    w = {k: np.asarray(v) for k, v in attention_weights(teacher.model.layers[0].self_attn).items()}
    d_inner, xw = 64, 32
    in_w = got["in_proj.kernel"].T
    np.testing.assert_array_equal(in_w[d_inner:d_inner + xw], w["v"])
    np.testing.assert_array_equal(in_w[d_inner + xw:d_inner + 2 * xw], w["k"])
    np.testing.assert_array_equal(in_w[d_inner + 2 * xw:d_inner + 2 * xw + 64], w["q"])
    fresh_in = fresh["in_proj.kernel"].T
    np.testing.assert_array_equal(in_w[:d_inner], fresh_in[:d_inner])  # z
    np.testing.assert_array_equal(in_w[-4:], fresh_in[-4:])  # dt
    np.testing.assert_array_equal(got["out_proj.kernel"].T, w["o"])
    for name in set(got) - {"in_proj.kernel", "out_proj.kernel"}:
        np.testing.assert_array_equal(got[name], fresh[name], err_msg=name)


# --- 4. GDN from attention ----------------------------------------------------------------------

def test_gdn_copies_blocks_and_keeps_fresh_rest():
    """GDN q/k: 2 heads x 16 = 32 rows (fewer than the teacher's 64: truncated); v: 2 x 64 = 128
    rows (more: the first 64 copied, the rest fresh); o: 128 input columns (first 64 copied)."""
    teacher = teacher_model(2)
    gdn = GDNConfig(num_heads=2, head_k_dim=16, expand_v=4.0, chunk_size=8)
    spec = ModelSpec.create(teacher.cfg, HybridConfig(attention_layers=(1,), gdn=gdn))
    student = upcycle(teacher, spec, seed=7)
    assert isinstance(student.model.layers[0].linear_attn, GatedDeltaNet)
    got = params(student.model.layers[0].linear_attn)
    fresh = params(spec.build(nnx.Rngs(7)).model.layers[0].linear_attn)
    t_attn = teacher.model.layers[0].self_attn
    wq, wk, wv, wo = (np.asarray(getattr(t_attn, n).kernel[...]).T for n in ("q_proj", "k_proj", "v_proj", "o_proj"))

    q, k, v, o = (got[f"{n}.kernel"].T for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    np.testing.assert_array_equal(q, wq[:32])
    np.testing.assert_array_equal(k, repeat_kv(wk, 2, 2)[:32])
    np.testing.assert_array_equal(v[:64], repeat_kv(wv, 2, 2))
    np.testing.assert_array_equal(v[64:], fresh["v_proj.kernel"].T[64:])
    np.testing.assert_array_equal(o[:, :64], wo)
    np.testing.assert_array_equal(o[:, 64:], fresh["o_proj.kernel"].T[:, 64:])
    copied = {f"{n}.kernel" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    for name in set(got) - copied:  # a/b/g_proj, convs, A_log, dt_bias, o_norm
        np.testing.assert_array_equal(got[name], fresh[name], err_msg=name)
    # The rest of the layer is the teacher's.
    for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
        want = params(getattr(teacher.model.layers[0], name))
        have = params(getattr(student.model.layers[0], name))
        assert want.keys() == have.keys()
        for key in want:
            np.testing.assert_array_equal(have[key], want[key], err_msg=f"{name}.{key}")


# --- 5. Qwen3 q/k norms folded, Qwen2 biases ignored ----------------------------------------------

def test_qwen3_qk_norm_scales_are_folded():
    teacher = teacher_model(3, arch="qwen3", qk_norm=True, head_dim=24, tie_word_embeddings=True)
    attn = teacher.model.layers[0].self_attn
    q_scale, k_scale = np.asarray(attn.q_norm.scale[...]), np.asarray(attn.k_norm.scale[...])
    assert np.abs(q_scale - 1).max() > 0.05 and np.abs(k_scale - 1).max() > 0.05
    w = attention_weights(attn)
    wq, wk = np.asarray(attn.q_proj.kernel[...]).T, np.asarray(attn.k_proj.kernel[...]).T
    # q_norm(W_Q h)_i = (W_Q h)_i / rms * scale: the diagonal scale moves into W_Q's rows.
    np.testing.assert_allclose(w["q"], wq * np.tile(q_scale, 4)[:, None], rtol=1e-6)
    np.testing.assert_allclose(w["k"], wk * np.tile(k_scale, 2)[:, None], rtol=1e-6)
    np.testing.assert_array_equal(w["v"], np.asarray(attn.v_proj.kernel[...]).T)
    np.testing.assert_array_equal(w["o"], np.asarray(attn.o_proj.kernel[...]).T)
    # ... and upcycling takes the folded weights (every initialiser reads attention_weights).
    gdn = GDNConfig(num_heads=4, head_k_dim=24, expand_v=1.0, chunk_size=8)
    student = upcycle(teacher, ModelSpec.create(teacher.cfg, HybridConfig(attention_layers=(1,), gdn=gdn)))
    lin = student.model.layers[0].linear_attn
    np.testing.assert_array_equal(np.asarray(lin.q_proj.kernel[...]).T, np.asarray(w["q"]))
    np.testing.assert_array_equal(np.asarray(lin.k_proj.kernel[...]).T, repeat_kv(np.asarray(w["k"]), 2, 2))


def test_qwen2_biases_are_ignored():
    mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    teacher, cfg = load_hf_model(make_torch_teacher("qwen2"), mesh)
    assert cfg.attention_bias
    attn = teacher.model.layers[0].self_attn
    assert np.abs(np.asarray(attn.q_proj.bias[...])).max() > 0  # the teacher does have biases
    gdn = GDNConfig(num_heads=4, head_k_dim=16, expand_v=1.0, chunk_size=8)
    student = upcycle(teacher, ModelSpec.create(cfg, HybridConfig(mla_layers=(1,), gdn=gdn, mla=TINY_MLA)))
    flat = [(p, v.get_value()) for p, v in nnx.to_flat_state(nnx.state(student, nnx.Param))]
    assert all(np.isfinite(np.asarray(v)).all() for _, v in flat)
    assert not any(p[-1] == "bias" for p, _ in flat)  # neither MLA nor GDN has q/k/v biases
    # The weights taken are the kernels alone (GDN: 4 heads x 16 = the teacher's query rows).
    lin = student.model.layers[0].linear_attn
    np.testing.assert_array_equal(np.asarray(lin.q_proj.kernel[...]), np.asarray(attn.q_proj.kernel[...]))
    for name in ("k_proj", "v_proj"):
        want = repeat_kv(np.asarray(getattr(attn, name).kernel[...]).T, 2, 2)
        np.testing.assert_array_equal(np.asarray(getattr(lin, name).kernel[...]).T, want, err_msg=name)


# --- 6. No replaced layer = the teacher ------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_all_attention_plan_reproduces_teacher(tied):
    teacher = teacher_model(4, tie_word_embeddings=tied)
    student = upcycle(teacher, ModelSpec.create(teacher.cfg, HybridConfig(attention_layers=(0, 1))))
    assert all(isinstance(layer.self_attn, Attention) for layer in student.model.layers)
    assert (student.lm_head is None) == tied
    x = tokens()
    err = rel_err(logits(student, x), logits(teacher, x))
    assert err <= 1e-6, err


def test_untied_student_head_from_tied_teacher():
    teacher = teacher_model(5, tie_word_embeddings=True)
    spec = ModelSpec.create(teacher.cfg, HybridConfig(attention_layers=(0, 1), tie_word_embeddings=False))
    student = upcycle(teacher, spec)
    assert teacher.lm_head is None and student.lm_head is not None
    np.testing.assert_array_equal(np.asarray(student.lm_head.kernel[...]),
                                  np.asarray(teacher.model.embed_tokens.embedding[...]).T)
    x = tokens(seed=1)
    err = rel_err(logits(student, x), logits(teacher, x))
    assert err <= 1e-6, err


# --- 7. Parameter count of HyLo-Llama-8MLA8GDN --------------------------------------------------------

LLAMA_32_1B = ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                          num_heads=32, num_kv_heads=8, head_dim=64, tie_word_embeddings=True,
                          rope=RopeConfig(theta=500000.0, type="llama3", factor=32.0,
                                          original_max_position_embeddings=8192))


def test_hylo_llama_8mla8gdn_parameter_count():
    plan = HybridConfig(mla_layers=tuple(range(0, 16, 2)),
                        mla=MLAConfig(q_lora_rank=1344, kv_lora_rank=128, qk_nope_head_dim=32,
                                      qk_rope_head_dim=32, v_head_dim=64),
                        tie_word_embeddings=False)
    spec = ModelSpec.create(LLAMA_32_1B, plan)
    model = nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))  # shapes only, no 1B weights
    count = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # The paper's 1,613,437,024 counts an untied LM head (128256 x 2048 = 262,668,288 more than a
    # tied one); with the teacher's tied head the same hybrid has 1,350,768,736 parameters.
    assert count == 1_613_437_024
    assert spec.layer_kinds() == ["mla", "gdn"] * 8


# --- 8. Bad plans ------------------------------------------------------------------------------------

@pytest.mark.parametrize("plan, match", [
    (dict(mla_layers=(2,)), r"hybrid.mla_layers \[2\] outside the teacher's 2 layers"),
    (dict(attention_layers=(-1,)), r"hybrid.attention_layers \[-1\] outside the teacher's 2 layers"),
    (dict(mla_layers=(0, 0)), r"hybrid.mla_layers names a layer twice"),
    (dict(mla_layers=(0,), attention_layers=(0, 1)),
     r"layers \[0\] are in both hybrid.mla_layers and hybrid.attention_layers"),
], ids=["outside", "negative", "twice", "both"])
def test_bad_layer_indices(plan, match):
    cfg = ModelConfig(**TINY)
    with pytest.raises(ConfigError, match=match):
        ModelSpec.create(cfg, HybridConfig(**plan))


@pytest.mark.parametrize("mla, match", [
    (dict(qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=16),
     r"qk_nope \+ qk_rope <= teacher head_dim \(12\+8 vs 16\)"),
    (dict(qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12),
     r"v_head_dim == head_dim \(12 vs 16\)"),
], ids=["qk_wider_than_head", "v_not_head_dim"])
def test_mla_ranks_larger_than_teacher(mla, match):
    teacher = teacher_model(0)
    spec = ModelSpec.create(teacher.cfg, HybridConfig(mla_layers=(0,), attention_layers=(1,),
                                                      mla=MLAConfig(q_lora_rank=32, kv_lora_rank=16, **mla)))
    with pytest.raises(ConfigError, match=match):
        upcycle(teacher, spec)


@pytest.mark.parametrize("ranks", [dict(q_lora_rank=72, kv_lora_rank=16),
                                   dict(q_lora_rank=32, kv_lora_rank=72)], ids=["q", "kv"])
def test_latent_rank_above_teacher_rank(ranks):
    """The tiny teacher's W_Q and [W_K; W_V] are 64 x 64 (rank 64); a latent of 72 cannot be filled."""
    w = attention_weights(teacher_model(0).model.layers[0].self_attn)
    cfg = MLAConfig(hidden_size=64, num_heads=4, num_kv_heads=2, qk_nope_head_dim=8,
                    qk_rope_head_dim=8, v_head_dim=16, **ranks)
    mla = zeros_module(lambda: MLA(cfg, rngs=nnx.Rngs(0)))
    name = "q_lora_rank" if ranks["q_lora_rank"] == 72 else "kv_lora_rank"
    with pytest.raises(ConfigError, match=rf"mla\.{name}=72 exceeds the rank of the teacher's matrix .* \(64 = "):
        init_mla(mla, w, 16)


def test_unknown_linear_mixer_and_mismatched_teacher():
    with pytest.raises(ConfigError, match=r"config.linear: 'rwkv' is not one of \['gdn', 'mamba2'\]"):
        from_dict(HybridConfig, {"linear": "rwkv"})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['mla_layer'\]"):
        from_dict(HybridConfig, {"mla_layer": [0]})
    teacher = teacher_model(0)
    other = ModelSpec.create(ModelConfig(**{**TINY, "num_layers": 3}), HybridConfig(attention_layers=(0, 1, 2)))
    with pytest.raises(ConfigError, match=r"student num_layers=3 differs from the teacher's 2"):
        upcycle(teacher, other)


# --- 9. Whole tiny hybrids --------------------------------------------------------------------------

# Three layers: MLA, the linear mixer, a kept attention layer.
PLANS = {
    "mla_gdn": HybridConfig(mla_layers=(0,), attention_layers=(2,), mla=TINY_MLA,
                            gdn=GDNConfig(num_heads=2, head_k_dim=16, expand_v=2.0, chunk_size=4)),
    "mla_mamba2": HybridConfig(mla_layers=(0,), attention_layers=(2,), mla=TINY_MLA, linear="mamba2",
                               mamba2=Mamba2Config(chunk_size=4)),
}


@functools.lru_cache(maxsize=None)
def tiny_hybrid(plan: str) -> CausalLM:
    teacher = teacher_model(6, num_layers=3)
    return upcycle(teacher, ModelSpec.create(teacher.cfg, PLANS[plan]), seed=1)


HYBRID_TOKENS = tokens(2, 12, seed=2)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _loss_and_grad(graphdef, state, toks):
    """Next-token cross-entropy on toks, its gradient and the logits."""
    def loss(state):
        lg = nnx.merge(graphdef, state)(toks)
        logp = jax.nn.log_softmax(lg[:, :-1], -1)
        return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], -1)), lg

    return jax.value_and_grad(loss, has_aux=True)(state)


@functools.lru_cache(maxsize=None)
def hybrid_loss_logits_grads(plan: str):
    """(loss, logits of HYBRID_TOKENS, flat ('path', gradient) list) of the plan's tiny hybrid."""
    graphdef, state = nnx.split(tiny_hybrid(plan), nnx.Param)
    (loss, out), grads = _loss_and_grad(graphdef, state, HYBRID_TOKENS)
    flat = [(path_str(p), np.asarray(g.get_value())) for p, g in nnx.to_flat_state(grads)]
    return float(loss), np.asarray(out), flat


@pytest.mark.parametrize("plan", list(PLANS))
def test_hybrid_forward_and_grad(plan):
    model = tiny_hybrid(plan)
    linear = PLANS[plan].linear
    assert ModelSpec(model.cfg, PLANS[plan]).layer_kinds() == ["mla", linear, "attention"]
    assert [type(layer.mixer) for layer in model.model.layers] == [
        MLA, GatedDeltaNet if linear == "gdn" else Mamba2Mixer, Attention]
    loss, out, grads = hybrid_loss_logits_grads(plan)
    assert out.shape == (2, 12, 64) and np.isfinite(out).all()
    assert np.isfinite(loss) and loss > 0
    assert len(grads) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert all(np.isfinite(g).all() for _, g in grads)
    for i in range(3):  # every mixer receives gradient
        assert any(np.abs(g).max() > 0 for name, g in grads if name.startswith(f"model.layers.{i}.")
                   and ("self_attn" in name or "linear_attn" in name)), i


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward_cached(graphdef, state, toks, caches, positions, kv_length):
    return nnx.merge(graphdef, state).forward_cached(toks, caches, positions, kv_length)


@pytest.mark.parametrize("plan", list(PLANS))
def test_hybrid_prefill_then_decode_matches_full(plan):
    model = tiny_hybrid(plan)
    full = hybrid_loss_logits_grads(plan)[1][:1]  # the full forward of the first sequence
    x = HYBRID_TOKENS[:1]
    graphdef, state = nnx.split(model)
    caches, outs, start = model.init_cache(1, 12), [], 0
    for size in (7, 1, 1, 1, 1, 1):  # prefill (MLA/GDN/SSD chunked paths), then one token at a time
        positions = jnp.arange(start, start + size)[None]
        out, caches = _forward_cached(graphdef, state, x[:, start:start + size], caches, positions,
                                      jnp.asarray([start + size]))
        outs.append(np.asarray(out))
        start += size
    assert start == 12
    err = rel_err(np.concatenate(outs, 1), full)
    assert err <= 1e-5, err


def test_energy_ratio_chooses_the_latent_ranks():
    from hylo_jax.convert.upcycle import with_energy_ranks

    teacher = teacher_model(0)
    plan = HybridConfig(mla_layers=(0, 1), mla=MLAConfig(q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=8,
                                                           qk_rope_head_dim=8, v_head_dim=16))
    full = with_energy_ranks(teacher, dataclasses.replace(plan, mla_energy_ratio=1.0))
    assert (full.mla.q_lora_rank, full.mla.kv_lora_rank) == (64, 64)  # all the energy: full rank
    half = with_energy_ranks(teacher, dataclasses.replace(plan, mla_energy_ratio=0.5))
    w = attention_weights(teacher.model.layers[0].self_attn)
    assert half.mla.q_lora_rank >= energy_rank(np.linalg.svd(np.asarray(w["q"]), compute_uv=False), 0.5)
    assert half.mla.q_lora_rank % 8 == 0 and half.mla.q_lora_rank < 64
    assert with_energy_ranks(teacher, plan) is plan
    with pytest.raises(ConfigError, match="mla_energy_ratio must be in"):
        with_energy_ranks(teacher, dataclasses.replace(plan, mla_energy_ratio=1.5))
