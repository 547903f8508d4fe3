"""`hylo plan`: AOT-compiled memory per device from abstract parameters, FLOPs, what fits; bad meshes fail first."""

import pytest
import yaml

from hylo_jax.cli import main

TEACHER = {"model": {"arch": "llama", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
                     "num_heads": 4, "num_kv_heads": 2, "head_dim": 8}}
RUN = {"teacher": "tiny", "out": "unused",
       "hybrid": {"mla_layers": [0], "linear": "gdn",
                  "mla": {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4,
                          "v_head_dim": 8},
                  "gdn": {"num_heads": 2, "head_k_dim": 8, "chunk_size": 8}},
       "mesh": {"fsdp": 2, "tensor": 2, "sequence": 2},
       "stage2": [{"name": "kd", "loss": "kd", "steps": 10, "seq_len": 64, "global_batch_size": 4, "kl_chunk": 32}]}


@pytest.fixture
def config(tmp_path):
    (tmp_path / "teachers").mkdir()
    (tmp_path / "teachers" / "tiny.yaml").write_text(yaml.safe_dump(TEACHER))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(RUN))
    return path


def test_plan_reports_memory_flops_and_what_fits(config, capsys):
    assert main(["plan", "--config", str(config), "--remat", "full", "--device-memory", "16"]) == 0
    out = capsys.readouterr().out
    assert "| kd | hybrid | 64 | full |" in out
    assert "kd: fits at seq_len 64 with remat=full" in out
    assert "MLA (latent gather / ring)" in out  # the sequence axis is 2: communication volume follows


def test_plan_refuses_a_mesh_that_does_not_divide_heads(config, capsys):
    assert main(["plan", "--config", str(config), "mesh.fsdp=1", "mesh.tensor=4"]) == 2
    assert "model.num_kv_heads=2 is not divisible by mesh axes ('tensor',) of size 4" in capsys.readouterr().err
