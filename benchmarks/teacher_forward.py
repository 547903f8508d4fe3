"""Teacher throughput: Flax Llama-3.2-1B-shaped model vs transformers (PyTorch, sdpa), bf16.

Prints one table: forward and forward+backward time, tokens/s, TFLOP/s and MFU against the bf16
matmul ceiling measured in the same run. Random weights (no hub access).
    python benchmarks/teacher_forward.py            # on the GPU
    python benchmarks/teacher_forward.py --tiny     # CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from common import matmul_ceiling_tflops, print_table, time_jax, time_torch  # noqa: E402

from hylo_jax.config import ModelConfig, RopeConfig  # noqa: E402
from hylo_jax.models.transformer import CausalLM  # noqa: E402

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                num_heads=32, num_kv_heads=8, head_dim=64, tie_word_embeddings=True,
                rope=RopeConfig(theta=500000.0, type="llama3", factor=32.0,
                                original_max_position_embeddings=8192))
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=32, tie_word_embeddings=True)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token: 2 x matmul parameters + causal attention (QK^T and PV, half masked)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    attn_proj = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = 3 * d * cfg.intermediate_size
    matmul_params = cfg.num_layers * (attn_proj + mlp) + d * cfg.vocab_size
    attention = cfg.num_layers * 2 * 2 * cfg.num_heads * hd * seq_len / 2
    return 2 * matmul_params + attention


def loss_fn(logits, tokens):
    """Next-token cross-entropy (what a training step computes on top of the logits)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def bench_jax(cfg: ModelConfig, batch: int, seq: int):
    model = CausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq)))

    @jax.jit
    def forward(params, tokens):
        return loss_fn(nnx.merge(graphdef, params)(tokens), tokens)

    @jax.jit
    def forward_backward(params, tokens):
        return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p)(tokens), tokens))(params)

    return time_jax(forward, params, tokens), time_jax(forward_backward, params, tokens)


def bench_torch(cfg: ModelConfig, batch: int, seq: int):
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, max_position_embeddings=131072,
        tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf).to(device=device, dtype=torch.bfloat16)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    def forward():
        with torch.no_grad():
            model(tokens, labels=tokens).loss.item()

    def forward_backward():
        model.zero_grad(set_to_none=True)
        model(tokens, labels=tokens).loss.backward()

    times = time_torch(forward), time_torch(forward_backward)
    del model
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small model and shapes (CPU smoke run)")
    args = parser.parse_args()
    shapes = [(2, 64)] if args.tiny else [(4, 2048), (1, 8192)]
    cfg = ModelConfig(**(TINY if args.tiny else LLAMA_1B), dtype="bfloat16", param_dtype="bfloat16")
    ceiling = matmul_ceiling_tflops(1024 if args.tiny else 8192)
    print(f"device: {jax.devices()[0].device_kind}; measured bf16 matmul ceiling {ceiling:.0f} TFLOP/s")
    rows = []
    for batch, seq in shapes:
        tokens = batch * seq
        flops = flops_per_token(cfg, seq) * tokens
        for name, (fwd, fwd_bwd) in (("hylo_jax (Flax NNX)", bench_jax(cfg, batch, seq)),
                                     ("transformers sdpa", bench_torch(cfg, batch, seq))):
            for mode, t, mult in (("fwd", fwd, 1), ("fwd+bwd", fwd_bwd, 3)):
                tflops = mult * flops / t / 1e12
                rows.append([name, f"{batch}x{seq}", mode, t * 1e3, tokens / t, tflops, tflops / ceiling])
    print_table(["impl", "B x T", "pass", "ms", "tokens/s", "TFLOP/s", "MFU (vs measured)"], rows)


if __name__ == "__main__":
    main()
