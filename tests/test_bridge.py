"""The import bridge's file formats, orbax round trip, and its errors on bad input."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_torch_teacher, rel_err

from hylo_jax.checkpoint import load_model, save_model
from hylo_jax.config import MeshConfig
from hylo_jax.convert.hf import load_hf_model
from hylo_jax.errors import CheckpointError, MeshError, UnsupportedArchitectureError
from hylo_jax.sharding import make_mesh

X = np.random.default_rng(0).integers(0, 128, (2, 9))


@pytest.fixture()
def mesh():
    return make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])


def reference_logits(model):
    with torch.no_grad():
        return model(torch.tensor(X)).logits.numpy()


def test_sharded_safetensors_index(tmp_path, mesh):
    ref = make_torch_teacher("llama3")
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model, _ = load_hf_model(tmp_path, mesh)
    assert rel_err(model(jnp.asarray(X)), reference_logits(ref)) <= 1e-5


def test_pytorch_bin_and_bf16_weights(tmp_path, mesh):
    ref = make_torch_teacher("qwen2").to(torch.bfloat16)
    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    model, cfg = load_hf_model(tmp_path, mesh, param_dtype="bfloat16")
    assert model.lm_head.kernel.get_value().dtype == jnp.bfloat16
    # exact weights: the bf16 values round-trip bit for bit
    np.testing.assert_array_equal(
        np.asarray(model.lm_head.kernel.get_value().astype(jnp.float32)),
        ref.lm_head.weight.detach().float().numpy().T)


def test_in_memory_module(mesh):
    ref = make_torch_teacher("qwen3")
    model, _ = load_hf_model(ref, mesh)
    assert rel_err(model(jnp.asarray(X)), reference_logits(ref)) <= 1e-5


def test_orbax_round_trip_onto_another_mesh(tmp_path, mesh):
    ref = make_torch_teacher("llama_tied")
    model, cfg = load_hf_model(ref, mesh)
    save_model(tmp_path / "ckpt", model, cfg)
    with pytest.raises(CheckpointError, match="exists"):
        save_model(tmp_path / "ckpt", model, cfg)
    other = make_mesh(MeshConfig(fsdp=2, tensor=2), jax.devices()[:4])
    restored, spec = load_model(tmp_path / "ckpt", other)
    assert spec.model == cfg and spec.hybrid is None
    emb = restored.model.embed_tokens.embedding.get_value()
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", ("fsdp", "sequence"))
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(model.model.embed_tokens.embedding.get_value()))


def test_unsupported_architecture(tmp_path, mesh):
    import transformers

    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="model_type 'gpt2' is not supported"):
        load_hf_model(tmp_path, mesh)


def test_truncated_safetensors(teacher_dirs, tmp_path, mesh):
    folder, _ = teacher_dirs["llama3"]
    shutil.copy(folder / "config.json", tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_model(tmp_path, mesh)


def test_missing_and_extra_tensors(tmp_path, mesh):
    from safetensors.torch import save_file

    ref = make_torch_teacher("llama3")
    ref.config.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    sd.pop("model.layers.1.mlp.up_proj.weight")
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_model(tmp_path, mesh)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"does not use.*self_attn\.extra\.weight"):
        load_hf_model(tmp_path, mesh)


def test_shape_mismatch_names_the_tensor(tmp_path, mesh):
    ref = make_torch_teacher("llama3")
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape"):
        load_hf_model(tmp_path, mesh)


def test_missing_folder_and_files(tmp_path, mesh):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_model(tmp_path, mesh)
    with pytest.raises(CheckpointError, match="not a hylo_jax model folder"):
        load_model(tmp_path, mesh)


def test_mesh_that_does_not_divide_heads(teacher_dirs):
    folder, _ = teacher_dirs["llama3"]  # 4 query heads, 2 key/value heads
    with pytest.raises(MeshError, match=r"model.num_kv_heads=2 is not divisible by mesh axes \('tensor',\) of size 4"):
        load_hf_model(folder, make_mesh(MeshConfig(fsdp=2, tensor=4)))


def test_mesh_that_does_not_divide_a_parameter():
    from hylo_jax.config import ModelConfig
    from hylo_jax.convert.hf import abstract_model
    from hylo_jax.sharding import state_shardings

    _, abstract = abstract_model(ModelConfig(hidden_size=36, num_heads=4, num_kv_heads=4, head_dim=8))
    with pytest.raises(MeshError, match=r"parameter \S+ has embed dimension 36, which mesh axes "
                                        r"\('fsdp', 'sequence'\) of size 8"):
        state_shardings(abstract, make_mesh(MeshConfig(fsdp=8)))
