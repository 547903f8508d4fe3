"""Export to Hugging Face / PyTorch (`hylo export`), on tiny fp32 models.

What is checked: upcycled hybrids of each kind (MLA + GDN / Mamba2, with and without kept attention,
Llama-3, Qwen2 and Qwen3 teachers, YaRN on the MLA layers) load with `AutoModelForCausalLM(...,
trust_remote_code=True)` and give hylo_jax's logits and greedy `generate()` tokens; import(export)
is the identity bit for bit and export(import) rewrites the same tensors; a teacher exports as the
native transformers class; sharded writing; unsupported input leaves nothing behind; the CLI.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import byte_tokenizer, make_torch_teacher, rel_err
from flax import nnx
from safetensors import safe_open

from hylo_jax.checkpoint import load_model, read_spec, save_model
from hylo_jax.cli import main
from hylo_jax.config import MeshConfig, RopeConfig
from hylo_jax.convert.hf import load_hf, load_hf_model
from hylo_jax.convert.sources import open_folder
from hylo_jax.convert.upcycle import upcycle
from hylo_jax.errors import ConfigError, UnsupportedArchitectureError
from hylo_jax.export import writer
from hylo_jax.export.writer import export_checkpoint, save_hf
from hylo_jax.generate import SamplingConfig, generate
from hylo_jax.models.gated_deltanet import GDNConfig
from hylo_jax.models.hybrid import HybridConfig, ModelSpec
from hylo_jax.models.mamba2 import Mamba2Config
from hylo_jax.models.mla import MLAConfig
from hylo_jax.sharding import make_mesh, path_str

# Tiny models run once: XLA's CPU optimisations cost more compile time than they save.
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True)
MESH = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
GDN = GDNConfig(num_heads=2, head_k_dim=16, expand_v=2.0, chunk_size=4)
MAMBA2 = Mamba2Config(chunk_size=4)
MLA = MLAConfig(q_lora_rank=32, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)
# Qwen3 teacher: head_dim 24; plain q_proj and DeepSeek's latent RMSNorms.
MLA_QWEN3 = MLAConfig(q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
                      latent_norm=True)
YARN = RopeConfig(theta=10000.0, type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=1.0,
                  mscale_all_dim=1.0)
CASES = {
    "llama3-mla-gdn-attention": ("llama3", HybridConfig(mla_layers=(0,), attention_layers=(2,), gdn=GDN, mla=MLA)),
    "llama3-mla-yarn-mamba2": ("llama3", HybridConfig(mla_layers=(1,), linear="mamba2", mamba2=MAMBA2, mla=MLA,
                                                      mla_rope=YARN)),
    "qwen3-mla-mamba2-attention": ("qwen3", HybridConfig(mla_layers=(0,), attention_layers=(1,), linear="mamba2",
                                                         mamba2=MAMBA2, mla=MLA_QWEN3)),
}


def student(teacher: str, plan: HybridConfig, seed: int = 0, **teacher_fields):
    """A 3-layer upcycled hybrid whose every parameter is moved off its initial value (so that a
    wrong layout of a ones-initialised norm or a zero bias would show)."""
    model, cfg = load_hf_model(make_torch_teacher(teacher, num_hidden_layers=3, **teacher_fields), MESH)
    spec = ModelSpec.create(cfg, plan)
    graphdef, state = nnx.split(upcycle(model, spec, seed=seed))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda v: v.replace(value=v[...] + rng.normal(0, 0.05, v.shape).astype(v.dtype)),
                         state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return nnx.merge(graphdef, state), spec


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _logits(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def jax_logits(model, x: np.ndarray) -> np.ndarray:
    return np.asarray(_logits(*nnx.split(model), jnp.asarray(x)))


def flat_params(model) -> dict[str, np.ndarray]:
    return {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def tokens(batch=2, length=13, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, (batch, length))


@pytest.mark.parametrize("case", CASES)
def test_hybrid_in_pytorch_matches(case, tmp_path):
    model, spec = student(*CASES[case])
    out = save_hf(model, spec, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hylo_hybrid" and config["mixer_types"] == spec.layer_kinds()
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hylo.HyloForCausalLM"
    tm = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(tm).__name__ == "HyloForCausalLM"

    x = tokens()
    err = rel_err(torch_logits(tm, x), jax_logits(model, x))
    print(f"{case}: logits rel. err {err:.2e}")
    assert err <= 1e-5, err

    prompt = x[:1, :5]
    (want,) = generate(model, [prompt[0].tolist()], SamplingConfig(max_new_tokens=6))
    with torch.no_grad():
        got = tm.generate(torch.tensor(prompt), max_new_tokens=6, do_sample=False, use_cache=True)
    assert got[0, 5:].tolist() == [int(t) for t in want]


def test_round_trip_and_sharding(tmp_path):
    """Qwen2 teacher (kept attention with q/k/v biases) + MLA + GDN, written in 30 kB shards."""
    model, spec = student("qwen2", HybridConfig(mla_layers=(2,), attention_layers=(0,), gdn=GDN, mla=MLA))
    ckpt = save_model(tmp_path / "ckpt", model, spec)
    hf = export_checkpoint(ckpt, tmp_path / "hf", MESH, max_shard_size=30_000)

    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(f.name for f in hf.glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert not (hf / "model.safetensors").exists()
    total = 0
    for shard in shards:
        with safe_open(str(hf / shard), framework="pt") as f:
            sizes = [f.get_tensor(n).numel() * 4 for n in f.keys()]
            assert set(f.keys()) == {n for n, s in index["weight_map"].items() if s == shard}
        assert sum(sizes) <= 30_000 or len(sizes) == 1, shard
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total

    # import(export(ckpt)) == ckpt, bit for bit
    back, back_spec = load_hf(hf, MESH)
    assert back_spec.model == spec.model and back_spec.layer_kinds() == spec.layer_kinds()
    assert (back_spec.hybrid.mla, back_spec.hybrid.gdn) == (spec.hybrid.mla, spec.hybrid.gdn)
    want, got = flat_params(model), flat_params(back)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    # export(import(folder)) == folder
    hf2 = save_hf(back, back_spec, tmp_path / "hf2", max_shard_size=30_000)
    assert json.loads((hf2 / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    assert (hf2 / "model.safetensors.index.json").read_text() == (hf / "model.safetensors.index.json").read_text()
    first, second = open_folder(hf), open_folder(hf2)
    assert first.names() == second.names()
    for name in first.names():
        np.testing.assert_array_equal(second.get(name), first.get(name), err_msg=name)

    tm = transformers.AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)
    x = tokens(seed=1)
    err = rel_err(torch_logits(tm, x), jax_logits(model, x))
    print(f"qwen2-attention-gdn-mla (sharded): logits rel. err {err:.2e}")
    assert err <= 1e-5, err


@pytest.mark.parametrize("name", ["llama3", "qwen2", "qwen3"])
def test_teacher_exports_as_native_class(name, teacher_dirs, tmp_path):
    folder, original = teacher_dirs[name]
    model, cfg = load_hf_model(folder, MESH)
    if name == "llama3":  # a plan that replaces no layer is the teacher too
        spec = ModelSpec.create(cfg, HybridConfig(attention_layers=(0, 1)))
        model = upcycle(model, spec)
    else:
        spec = ModelSpec(cfg)
    out = save_hf(model, spec, tmp_path / "hf")
    assert not (out / "modeling_hylo.py").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == original.config.model_type
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(back) is type(original)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim",
                "rope_parameters", "tie_word_embeddings", "rms_norm_eps"):
        if hasattr(original.config, key):  # Qwen2Config has no head_dim
            assert getattr(back.config, key) == getattr(original.config, key), key
    want, got = original.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_unsupported_input_leaves_nothing(teacher_dirs, tmp_path, monkeypatch):
    folder, _ = teacher_dirs["llama3"]
    model, cfg = load_hf_model(folder, MESH)
    target = tmp_path / "out" / "hf"
    with pytest.raises(ConfigError, match="export dtype 'float16' is not supported"):
        save_hf(model, ModelSpec(cfg), target, dtype="float16")
    assert not target.parent.exists()

    calls = []

    def failing_gather(value):  # the disk fills up after two tensors
        calls.append(1)
        if len(calls) > 2:
            raise OSError("no space left on device")
        return np.asarray(value)

    monkeypatch.setattr(writer, "gather", failing_gather)
    with pytest.raises(OSError, match="no space left"):
        save_hf(model, ModelSpec(cfg), target, max_shard_size=10_000)
    assert list(target.parent.iterdir()) == []  # no partial folder, no temporary one
    monkeypatch.undo()

    out = save_hf(model, ModelSpec(cfg), target)
    with pytest.raises(Exception, match="exists; choose a new --out folder"):
        save_hf(model, ModelSpec(cfg), target)

    config = json.loads((out / "config.json").read_text())
    config.update(model_type="hylo_hybrid", base_model_type="llama", mixer_types=["attention", "lstm"])
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match=r"mixer_types \['lstm'\]"):
        load_hf(out, MESH)


def test_cli_export_bf16_with_tokenizer_and_import(tmp_path, capsys):
    """`hylo export` of a sharded (8-device) hybrid with its tokenizer, then `hylo import` of the result."""
    model, spec = student("llama_tied", HybridConfig(mla_layers=(1,), gdn=GDN, mla=MLA), vocab_size=264)
    tokenizer = byte_tokenizer()
    ckpt = save_model(tmp_path / "ckpt", model, spec, tokenizer=tokenizer)
    out = tmp_path / "hf"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out), "--dtype", "bf16",
                 "--max-shard-size", "40KB"]) == 0
    assert "exported" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    exported = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
    assert exported("hi")["input_ids"] == tokenizer("hi")["input_ids"]
    with safe_open(str(next(out.glob("model-*.safetensors"))), framework="pt") as f:
        assert all(f.get_tensor(n).dtype == torch.bfloat16 for n in f.keys())

    assert main(["import", "--hf", str(out), "--out", str(tmp_path / "back")]) == 0
    assert read_spec(tmp_path / "back").layer_kinds() == spec.layer_kinds()
    back, _ = load_model(tmp_path / "back", MESH)
    want, got = flat_params(model), flat_params(back)
    for name in want:
        rounded = want[name].astype(jnp.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(got[name], rounded, err_msg=name)

    # In PyTorch: the bf16 weights are exact (run in fp32), and bf16 activations err no more than
    # hylo_jax's own bf16 compute does (on this tiny random model both are far from fp32).
    x = tokens(length=9, seed=2)
    want = jax_logits(back, x)
    tm32 = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    err32 = rel_err(torch_logits(tm32, x), want)
    tm = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert tm.dtype == torch.bfloat16
    err16 = rel_err(torch_logits(tm, x), want)
    jax16 = rel_err(jax_logits(load_model(tmp_path / "back", MESH, dtype="bfloat16")[0], x), want)
    print(f"bf16 export: logits rel. err run in fp32 {err32:.2e}; in bf16 {err16:.2e} (hylo_jax bf16: {jax16:.2e})")
    assert err32 <= 1e-5 and err16 <= jax16, (err32, err16, jax16)
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "x"), "--max-shard-size", "lots"]) == 2
