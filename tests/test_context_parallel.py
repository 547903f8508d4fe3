"""Context parallelism on the `sequence` mesh axis: sharded forward outputs and gradients equal the
unsharded ones (fp32), with packed documents crossing shard boundaries, for every mixer, the conv,
and a whole hybrid; ring and all-gather agree; zig-zag load balancing is a pure relayout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from flax import nnx

from hylo_jax.config import MeshConfig, ModelConfig
from hylo_jax.errors import MeshError
from hylo_jax.models.gated_deltanet import GatedDeltaNet, GDNConfig
from hylo_jax.models.hybrid import HybridConfig, ModelSpec
from hylo_jax.models.mamba2 import Mamba2Config, Mamba2Mixer
from hylo_jax.models.mla import MLA, MLAConfig
from hylo_jax.models.recurrent import CausalConv1d
from hylo_jax.models.transformer import Attention, segment_positions
from hylo_jax.parallel import context
from hylo_jax.sharding import make_mesh

T = 32
TOL = 1e-5
# Row 0: four documents (boundaries at 5, 16, 25: inside shards and on a shard edge); row 1: two.
SEGMENTS = np.stack([np.repeat([1, 2, 3, 4], [5, 11, 9, 7]), np.repeat([1, 2], [13, 19])]).astype(np.int32)
TEACHER = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
MLA_CFG = MLAConfig(hidden_size=32, num_heads=4, num_kv_heads=2, q_lora_rank=12, kv_lora_rank=16,
                    qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=8)


def seq_mesh(shards: int):
    """sequence = shards, with fsdp and tensor filling the 8 devices where they can."""
    tensor = 2 if shards <= 4 else 1
    return make_mesh(MeshConfig(fsdp=-1, tensor=tensor, sequence=shards))


def run_mixer(module, x, segments, *, mesh=None, mode="allgather", load_balance=False, attention="auto"):
    """(output, d loss / d params, d loss / d x) of a mixer on [b, T, d] inputs, optionally sequence-sharded
    (inputs are permuted to the zig-zag layout and outputs permuted back when load balancing)."""
    graphdef, params = nnx.split(module)
    seg = None if segments is None else jnp.asarray(segments)
    pos = (segment_positions(seg) if seg is not None
           else jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2]))
    weight = jax.random.normal(jax.random.key(7), x.shape[:2] + (module_width(module),))
    perm = context.zigzag_order(x.shape[1], mesh.shape["sequence"]) if load_balance else np.arange(x.shape[1])
    inv = np.argsort(perm)

    def forward(params, x):
        y, _ = nnx.merge(graphdef, params)(x[:, perm], positions=pos[:, perm],
                                           segment_ids=None if seg is None else seg[:, perm], cache=None)
        return y[:, inv]

    def loss(params, x):
        y = forward(params, x)
        return jnp.sum(y * weight), y

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    if mesh is None:
        (_, y), grads = fn(params, x)
    else:
        with jax.set_mesh(mesh), context.settings(mode, load_balance, attention):
            (_, y), grads = fn(params, x)
    return y, grads


def module_width(module) -> int:
    return module.cfg.hidden_size


def assert_close(got, want, tol=TOL):
    y, (gp, gx) = got
    y_ref, (gp_ref, gx_ref) = want
    assert rel_err(y, y_ref) <= tol
    assert rel_err(gx, gx_ref) <= tol
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gp_ref), strict=True):
        assert rel_err(a, b) <= tol


def inputs(width=32, seed=0):
    return jax.random.normal(jax.random.key(seed), (2, T, width))


MIXERS = {
    "mla": lambda: MLA(MLA_CFG, rngs=nnx.Rngs(0)),
    "attention": lambda: Attention(TEACHER, rngs=nnx.Rngs(0)),
    "mamba2": lambda: Mamba2Mixer(Mamba2Config(hidden_size=32, num_heads=4, head_dim=8, d_state=8, n_groups=4,
                                               num_xb_heads=2, chunk_size=4), rngs=nnx.Rngs(0)),
    "gdn": lambda: GatedDeltaNet(GDNConfig(hidden_size=32, num_heads=2, head_k_dim=8, chunk_size=4),
                                 rngs=nnx.Rngs(0)),
}

CASES = [  # (mixer, shards, mode, packed segments, zig-zag)
    pytest.param("mla", 2, "allgather", True, False, marks=pytest.mark.slow),
    ("mla", 4, "ring", True, False),
    pytest.param("mla", 8, "ring", False, False, marks=pytest.mark.slow),
    ("mla", 4, "allgather", True, True),
    pytest.param("attention", 4, "ring", True, False, marks=pytest.mark.slow),
    ("mamba2", 2, "allgather", True, False),
    pytest.param("mamba2", 4, "allgather", False, False, marks=pytest.mark.slow),
    pytest.param("mamba2", 8, "allgather", True, False, marks=pytest.mark.slow),
    ("mamba2", 4, "allgather", True, True),
    ("gdn", 2, "allgather", True, False),
    pytest.param("gdn", 4, "allgather", True, False, marks=pytest.mark.slow),
    pytest.param("gdn", 8, "allgather", False, False, marks=pytest.mark.slow),
    pytest.param("gdn", 2, "allgather", True, True, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name, shards, mode, packed, zigzag", CASES)
def test_mixer_matches_unsharded(name, shards, mode, packed, zigzag):
    module, x = MIXERS[name](), inputs()
    segments = SEGMENTS if packed else None
    want = run_mixer(module, x, segments)
    got = run_mixer(module, x, segments, mesh=seq_mesh(shards), mode=mode, load_balance=zigzag)
    assert_close(got, want)


@pytest.mark.parametrize("mode, zigzag", [("ring", True), ("allgather", False)])
def test_query_tiles_match_unsharded(monkeypatch, mode, zigzag):
    """Long local blocks attend one query tile at a time (bounded scores memory): same outputs and gradients."""
    monkeypatch.setattr(context, "SCORE_TILE_BYTES", 1)  # tiles of the fewest rows the halving allows
    module, x = MIXERS["mla"](), inputs(seed=2)
    want = run_mixer(module, x, SEGMENTS)
    got = run_mixer(module, x, SEGMENTS, mesh=seq_mesh(2), mode=mode, load_balance=zigzag)
    assert_close(got, want)


@pytest.mark.parametrize("name, mode, zigzag", [("mla", "ring", True), ("attention", "allgather", False)])
def test_flash_block_kernel_matches_unsharded(name, mode, zigzag):
    """attention='pallas' (the flash block kernel, interpret mode on CPU; head dims it takes: MLA's
    32 = 16 + 16 split in power-of-two parts): outputs and gradients equal the unsharded ones."""
    import dataclasses

    module = (MLA(dataclasses.replace(MLA_CFG, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16),
                  rngs=nnx.Rngs(0)) if name == "mla" else
              Attention(dataclasses.replace(TEACHER, head_dim=16), rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(4), (2, 2 * T, 32))
    segments = np.repeat(SEGMENTS, 2, axis=1)
    want = run_mixer(module, x, segments)
    got = run_mixer(module, x, segments, mesh=seq_mesh(2), mode=mode, load_balance=zigzag, attention="pallas")
    assert_close(got, want)


def test_flash_block_kernel_refuses_unsupported_dims():
    module, x = MIXERS["mla"](), inputs()  # qk head dim 8: below the kernel's smallest dot
    with pytest.raises(ValueError, match="attention='pallas'"):
        run_mixer(module, x, SEGMENTS, mesh=seq_mesh(2), attention="pallas")


@pytest.mark.slow
def test_ring_and_allgather_agree():
    module, x, mesh = MIXERS["mla"](), inputs(seed=1), seq_mesh(4)
    ring = run_mixer(module, x, SEGMENTS, mesh=mesh, mode="ring")
    gather = run_mixer(module, x, SEGMENTS, mesh=mesh, mode="allgather")
    assert_close(ring, gather, tol=2e-6)


class ConvOnly(nnx.Module):
    """The causal conv with the mixer call interface (prefix = zeros), for the test harness."""

    def __init__(self, channels, kernel_size):
        self.conv = CausalConv1d(channels, kernel_size, use_bias=True, rngs=nnx.Rngs(3))
        self.cfg = type("Cfg", (), {"hidden_size": channels})
        self.kernel_size = kernel_size

    def __call__(self, x, *, positions, segment_ids, cache):
        prefix = jnp.zeros((x.shape[0], self.kernel_size - 1, x.shape[2]), x.dtype)
        return self.conv(x, prefix, segment_ids)[0], None


@pytest.mark.parametrize("shards, packed, zigzag", [(8, True, False), (4, True, True),
                                                    pytest.param(4, True, False, marks=pytest.mark.slow),
                                                    pytest.param(2, False, False, marks=pytest.mark.slow)])
def test_conv_halo(shards, packed, zigzag):
    module, x = ConvOnly(16, 4), inputs(16)
    segments = SEGMENTS if packed else None
    want = run_mixer(module, x, segments)
    got = run_mixer(module, x, segments, mesh=seq_mesh(shards), load_balance=zigzag)
    assert_close(got, want)


HYBRID = HybridConfig(mla_layers=(0,), linear="gdn", mla=MLAConfig(q_lora_rank=12, kv_lora_rank=16,
                                                                   qk_nope_head_dim=4, qk_rope_head_dim=4,
                                                                   v_head_dim=8),
                      gdn=GDNConfig(num_heads=2, head_k_dim=8, chunk_size=4))


@pytest.mark.parametrize("linear, shards, mode", [
    ("gdn", 4, "ring"), pytest.param("mamba2", 2, "allgather", marks=pytest.mark.slow)])
def test_hybrid_matches_unsharded(linear, shards, mode):
    import dataclasses

    spec = ModelSpec.create(TEACHER, dataclasses.replace(HYBRID, linear=linear,
                                                         mamba2=Mamba2Config(chunk_size=4)))
    model = spec.build(nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, TEACHER.vocab_size)
    seg = jnp.asarray(SEGMENTS)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens, segment_ids=seg)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0]), logits

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, want), g_want = fn(params)
    with jax.set_mesh(seq_mesh(shards)), context.settings(mode):
        (_, got), g_got = fn(params)
    assert rel_err(got, want) <= TOL
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
        assert rel_err(a, b) <= 5 * TOL  # two layers of fp32 reductions in a different order


def test_sequence_not_divisible_is_a_mesh_error():
    module, x = MIXERS["gdn"](), inputs()[:, :30]
    with jax.set_mesh(seq_mesh(4)), pytest.raises(MeshError, match="sequence length 30 is not divisible"):
        jax.jit(lambda x: module(x, positions=None)[0]).lower(x)


def test_zigzag_order_round_trips():
    perm = context.zigzag_order(16, 2)
    assert perm.tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    assert (perm[context.zigzag_inverse(16, 2)] == np.arange(16)).all()
