"""Test setup: 8 simulated CPU devices, offline Hugging Face, tiny random teachers on disk."""

import os

# 8 CPU devices. The tests' programs are tiny and compiling dominates: LLVM's optimisations off (-30% suite time)
# and XLA:CPU's MLIR fusion emitters off (its legacy emitters compile the GDN op's gradient 3.4x faster at -O0).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HYLO_COMPILATION_CACHE", "off")  # the CLI's cache stays out of ~/.cache (test_resume sets one)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

# name -> (model class, config class, extra config fields)
TEACHERS = {
    "llama3": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
               dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                         low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=64))),
    "llama_tied": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
                   dict(tie_word_embeddings=True)),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config,
              dict(head_dim=24, tie_word_embeddings=True)),
}


BYTE_SPECIAL = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]


def byte_tokenizer():
    """A byte-level tokenizer built offline (one token per byte, 261 ids), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    model = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(BYTE_SPECIAL + alphabet)}, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    model.decoder = decoders.ByteLevel()
    model.add_special_tokens(BYTE_SPECIAL)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<eos>", pad_token="<pad>")
    hf.chat_template = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return hf


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def make_torch_teacher(name: str, seed: int = 0, **overrides):
    """A tiny random transformers model with non-trivial weights (biases, norms included)."""
    model_cls, config_cls, extra = TEACHERS[name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **extra, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(1.0)
    return model


@pytest.fixture(scope="session")
def teacher_dirs(tmp_path_factory):
    """Each tiny teacher saved with `save_pretrained` (safetensors): name -> (folder, model)."""
    out = {}
    for name in TEACHERS:
        model = make_torch_teacher(name)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out
