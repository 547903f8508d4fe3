"""The `hylo` command end to end on tiny teachers, and the published configs' arithmetic."""

import glob
import re

import pytest
import yaml

from hylo_jax.checkpoint import load_model, read_spec
from hylo_jax.cli import main
from hylo_jax.config import MeshConfig
from hylo_jax.sharding import make_mesh

# KV cache of each published model as a fraction of its teacher's (RECIPE.md / the paper).
PUBLISHED_KV = {"hylo-llama-1b-4mla12": 3.9, "hylo-llama-1b-8mla8": 7.8, "hylo-llama-3b-6mla22": 2.0,
                "hylo-llama-3b-14mla14": 4.7, "hylo-qwen3-1.7b-7mla21": 3.9,
                "hylo-qwen3-1.7b-14mla14": 7.8}


@pytest.mark.parametrize("name", sorted(PUBLISHED_KV))
@pytest.mark.parametrize("linear", ["gdn", "mamba2"])
def test_published_configs_kv_fraction(name, linear, capsys):
    assert main(["info", "--config", f"configs/{name}.yaml", f"hybrid.linear={linear}"]) == 0
    out = capsys.readouterr().out
    fraction = float(re.search(r"vs teacher [\d,]+ B \(([\d.]+)%\)", out).group(1))
    assert fraction == PUBLISHED_KV[name]
    if (name, linear) == ("hylo-llama-1b-8mla8", "gdn"):
        assert "total                  1,613,437,024" in out  # HyLo-Llama-8MLA8GDN, the paper's count


def test_every_config_is_listed():
    found = {p.split("/")[-1][:-5] for p in glob.glob("configs/hylo-*.yaml")}
    assert found == set(PUBLISHED_KV)


def tiny_plan(tmp_path, linear="gdn"):
    plan = {"hybrid": {"mla_layers": [1], "linear": linear,
                       "mla": {"q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 8,
                               "qk_rope_head_dim": 8, "v_head_dim": 16},
                       "gdn": {"num_heads": 2, "head_k_dim": 16}}}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


def test_upcycle_info_and_select_layers(teacher_dirs, tmp_path, capsys):
    folder, _ = teacher_dirs["llama3"]
    plan = tiny_plan(tmp_path)
    assert main(["upcycle", "--teacher", str(folder), "--config", str(plan), "--out",
                 str(tmp_path / "student")]) == 0
    spec = read_spec(tmp_path / "student")
    assert spec.layer_kinds() == ["gdn", "mla"]
    model, _ = load_model(tmp_path / "student", make_mesh(MeshConfig()))
    assert model.model.layers[1].self_attn.cfg.kv_lora_rank == 32
    capsys.readouterr()
    assert main(["info", "--ckpt", str(tmp_path / "student")]) == 0
    assert "layers: 1 gdn, 1 mla" in capsys.readouterr().out

    text = tmp_path / "heldout.txt"
    text.write_text(" ".join(str(i) for i in range(400)))
    # tiny teachers have no tokenizer: select-layers must say so clearly
    assert main(["select-layers", "--teacher", str(folder), "--config", str(plan), "--num-mla", "1",
                 "--text", str(text)]) == 2
    assert "needs the teacher's tokenizer" in capsys.readouterr().err


def test_bad_plan_is_a_clear_error(teacher_dirs, tmp_path, capsys):
    folder, _ = teacher_dirs["llama3"]
    plan = tmp_path / "bad.yaml"
    plan.write_text(yaml.safe_dump({"hybrid": {"mla_layers": [7]}}))
    assert main(["upcycle", "--teacher", str(folder), "--config", str(plan), "--out", str(tmp_path / "s")]) == 2
    assert "hybrid.mla_layers [7] outside the teacher's 2 layers" in capsys.readouterr().err
    assert main(["upcycle", "--teacher", str(folder), "--config", str(plan), "--out", str(tmp_path / "s"),
                 "hybrid.linear=rwkv"]) == 2
    assert "'rwkv' is not one of" in capsys.readouterr().err


def test_select_layers_ranks_trained_students(tmp_path, capsys):
    """select-layers with given all-MLA / all-linear students and a tokenizer: a ranking and a plan."""
    import dataclasses

    from conftest import byte_tokenizer
    from flax import nnx

    from hylo_jax.checkpoint import save_model
    from hylo_jax.config import ModelConfig, from_dict
    from hylo_jax.convert.upcycle import upcycle
    from hylo_jax.models.hybrid import HybridConfig, ModelSpec
    from hylo_jax.models.transformer import CausalLM

    cfg = ModelConfig(vocab_size=261, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    teacher = CausalLM(cfg, rngs=nnx.Rngs(0))
    save_model(tmp_path / "teacher", teacher, cfg, tokenizer=byte_tokenizer())
    plan = yaml.safe_load(tiny_plan(tmp_path).read_text())["hybrid"]
    plan["mla"].update(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=8)
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump({"hybrid": plan}))
    hybrid = from_dict(HybridConfig, plan)
    for name, layers in (("mla", (0, 1, 2)), ("linear", ())):
        spec = ModelSpec.create(cfg, dataclasses.replace(hybrid, mla_layers=layers))
        save_model(tmp_path / name, upcycle(teacher, spec, seed=1), spec)
    text = tmp_path / "heldout.txt"
    text.write_text("to be or not to be, that is the question " * 20)
    assert main(["select-layers", "--teacher", str(tmp_path / "teacher"), "--config", str(tmp_path / "plan.yaml"),
                 "--num-mla", "1", "--text", str(text), "--batch", "2", "--seq-len", "32",
                 "--mla-student", str(tmp_path / "mla"), "--linear-student", str(tmp_path / "linear"),
                 "--out", str(tmp_path / "chosen.yaml")]) == 0
    out = capsys.readouterr().out
    assert "all-linear student: KL to teacher" in out and "chosen mla_layers: [" in out
    chosen = yaml.safe_load((tmp_path / "chosen.yaml").read_text())["hybrid"]["mla_layers"]
    assert len(chosen) == 1 and 0 <= chosen[0] < 3
