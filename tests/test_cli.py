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
