"""FSDP x tensor x sequence training of a tiny hybrid equals one device; bad meshes fail before compiling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hylo_jax.config import MeshConfig, ModelConfig
from hylo_jax.convert.upcycle import upcycle
from hylo_jax.errors import MeshError
from hylo_jax.models.gated_deltanet import GDNConfig
from hylo_jax.models.hybrid import HybridConfig, ModelSpec
from hylo_jax.models.mla import MLAConfig
from hylo_jax.models.transformer import CausalLM
from hylo_jax.parallel import context
from hylo_jax.sharding import make_mesh, place, state_shardings
from hylo_jax.train.config import StageConfig
from hylo_jax.train.step import Distiller

TEACHER = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
PLAN = HybridConfig(mla_layers=(0,), linear="gdn",
                    mla=MLAConfig(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=4, qk_rope_head_dim=4,
                                  v_head_dim=8),
                    gdn=GDNConfig(num_heads=2, head_k_dim=8, chunk_size=8))
SPEC = ModelSpec.create(TEACHER, PLAN)
STEPS = 3


def make_batch(b=4, t=32, seed=0):
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, TEACHER.vocab_size, (b, t + 1))
    seg = np.ones((b, t), np.int32)
    seg[:, 11:] = 2  # documents cross the shard boundaries
    seg[:, 27:] = 3
    pos = np.concatenate([np.arange(11), np.arange(16), np.arange(5)])[None].repeat(b, 0)
    return dict(tokens=tok[:, :-1], targets=tok[:, 1:], segment_ids=seg, positions=pos,
                loss_mask=np.ones((b, t), np.int32))


def train(mesh=None, mode="allgather", load_balance=False, loss="kd", grad_accum=1):
    """Losses of STEPS steps of the fused distillation step, on one device or on `mesh`."""
    teacher = CausalLM(TEACHER, rngs=nnx.Rngs(1))
    student = upcycle(teacher, SPEC, seed=0)
    stage = StageConfig(loss=loss, steps=STEPS, lr=1e-3, warmup_ratio=0.0, kl_chunk=16, grad_accum=grad_accum)
    if mesh is None:
        distiller = Distiller(student, teacher, stage)
        state = distiller.init_state()
        batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
        out = []
        for _ in range(STEPS):
            state, metrics = distiller.run_step(state, batch)
            out.append(float(metrics["loss"]))
        return out, None
    SPEC.check_mesh(mesh)
    place(teacher, mesh), place(student, mesh)
    distiller = Distiller(student, teacher, stage)
    sharding = jax.NamedSharding(mesh, jax.P(("data", "fsdp"), "sequence"))
    batch = {k: jax.device_put(v, sharding) for k, v in make_batch().items()}
    out = []
    with jax.set_mesh(mesh), context.settings(mode, load_balance):
        state = distiller.init_state()
        for _ in range(STEPS):
            state, metrics = distiller.run_step(state, batch)
            out.append(float(metrics["loss"]))
    return out, state


@pytest.mark.parametrize("mode, load_balance, loss, grad_accum", [
    ("allgather", False, "kd", 2),  # also: 2 microbatches of 2 rows, one per fsdp shard, give the whole batch's
    pytest.param("ring", True, "kd", 1, marks=pytest.mark.slow),
    pytest.param("ring", False, "ild", 1, marks=pytest.mark.slow),
])
def test_fsdp_tensor_sequence_training_matches_one_device(mode, load_balance, loss, grad_accum):
    devices = jax.devices()[:8]
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2, sequence=2), devices)
    want, _ = train(loss=loss)
    got, state = train(mesh, mode, load_balance, loss, grad_accum)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    assert want[-1] < want[0]
    # parameters and optimiser moments stay sharded per the logical rules (fsdp on embed, tensor on heads)
    kernel = state.params["model"]["layers"][0]["self_attn"]["q_b_proj"]["kernel"]
    assert kernel.get_value().sharding.spec == jax.P(None, "tensor")
    embed = state.params["model"]["layers"][1]["linear_attn"]["q_proj"]["kernel"].get_value()
    assert embed.sharding.spec == jax.P(("fsdp", "sequence"), "tensor")
    assert len(embed.addressable_shards) == 8 and embed.addressable_shards[0].data.shape == (8, 8)


def test_teacher_and_student_share_the_rules():
    """The teacher's and the student's parameters with the same role get the same sharding."""
    mesh = make_mesh(MeshConfig(fsdp=2, tensor=2, sequence=2))
    t = state_shardings(nnx.state(nnx.eval_shape(lambda: CausalLM(TEACHER, rngs=nnx.Rngs(0)))), mesh)
    s = state_shardings(nnx.state(nnx.eval_shape(lambda: SPEC.build(nnx.Rngs(0)))), mesh)
    for part in ("mlp", "input_layernorm"):
        assert jax.tree.leaves(t["model"]["layers"][1][part]) == jax.tree.leaves(s["model"]["layers"][1][part])
    assert t["model"]["embed_tokens"]["embedding"].spec == s["model"]["embed_tokens"]["embedding"].spec


@pytest.mark.parametrize("mesh_cfg, seq_len, load_balance, match", [
    (MeshConfig(fsdp=2, sequence=4), 30, False, "sequence length 30 is not divisible"),
    (MeshConfig(fsdp=2, sequence=4), 36, True, r"x2 zig-zag chunks"),
    (MeshConfig(fsdp=1, sequence=8), 16, False, "shorter than the conv history"),
])
def test_sequence_that_does_not_divide_is_a_mesh_error(mesh_cfg, seq_len, load_balance, match):
    with pytest.raises(MeshError, match=match):
        context.check_sequence(make_mesh(mesh_cfg), seq_len, load_balance=load_balance, conv_kernel=4)


def test_heads_and_batch_that_do_not_divide_are_mesh_errors():
    from hylo_jax.train.step import check_batch_divides

    with pytest.raises(MeshError, match=r"model.num_kv_heads=2 is not divisible by mesh axes \('tensor',\) of size 4"):
        SPEC.check_mesh(make_mesh(MeshConfig(fsdp=2, tensor=4)))
    mesh = make_mesh(MeshConfig(fsdp=4, sequence=2))
    with pytest.raises(MeshError, match=r"global_batch_size=6 is not divisible by mesh axes \('data', 'fsdp'\)"):
        check_batch_divides(mesh, StageConfig(global_batch_size=6))
    with pytest.raises(MeshError, match=r"global_batch_size / grad_accum=2 is not divisible by mesh axes"):
        check_batch_divides(mesh, StageConfig(global_batch_size=8, grad_accum=4))
    check_batch_divides(mesh, StageConfig(global_batch_size=8, grad_accum=2))
