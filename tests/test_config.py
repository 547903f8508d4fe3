"""Config loading, overrides and mesh resolution."""

import pytest

from hylo_jax.config import MeshConfig, ModelConfig, apply_overrides, describe, from_dict, load_yaml, save_yaml
from hylo_jax.errors import ConfigError, MeshError
from hylo_jax.sharding import logical_to_spec, resolve_mesh_shape


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = ModelConfig(arch="qwen3", qk_norm=True)
    save_yaml({"model": cfg}, tmp_path / "c.yaml")
    data = apply_overrides(load_yaml(tmp_path / "c.yaml"), ["model.rope.type=yarn", "model.rope.factor=4",
                                                          "model.dtype=bfloat16"])
    out = from_dict(ModelConfig, data["model"])
    assert out.rope.type == "yarn" and out.rope.factor == 4.0 and out.dtype == "bfloat16"
    assert out.qk_norm


@pytest.mark.parametrize("data, message", [
    ({"hidden_sise": 3}, r"unknown key\(s\) \['hidden_sise'\]"),
    ({"num_layers": "four"}, "expected an integer"),
    ({"dtype": "fp8"}, "is not one of"),
    ({"rope": {"type": "ntk"}}, r"model\.rope\.type"),
    ({"num_heads": 6, "num_kv_heads": 4}, "not a multiple"),
    ({"tie_word_embeddings": "yes"}, "expected true/false"),
])
def test_bad_model_configs(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, data, "model")


def test_bad_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["model.dtype"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")


def test_mesh_resolution():
    assert resolve_mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == dict(
        data=2, fsdp=2, tensor=2, sequence=1)
    with pytest.raises(MeshError, match="does not divide"):
        resolve_mesh_shape(MeshConfig(tensor=3), 8)
    with pytest.raises(MeshError, match="multiplies to 4"):
        resolve_mesh_shape(MeshConfig(data=2, fsdp=2), 8)
    with pytest.raises(MeshError, match="at most one -1"):
        resolve_mesh_shape(MeshConfig(data=-1, fsdp=-1), 8)


def test_logical_rules_and_describe():
    assert tuple(logical_to_spec(("embed", "mlp"))) == (("fsdp", "sequence"), "tensor")
    assert tuple(logical_to_spec(("act_batch", "act_length", None))) == (("data", "fsdp"), "sequence", None)
    text = describe(ModelConfig, "model.")
    assert "model.rope.theta = 10000.0  # Base of the rotary frequencies." in text
