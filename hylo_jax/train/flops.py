"""Model FLOPs per token (as MaxText counts them) and device peak FLOP/s for MFU.

Forward FLOPs per token = 2 x matmul parameters (LM head included, embedding lookup not)
+ causal attention 2 x 2 x heads x (d_qk + d_v) / 2 x T per attention/MLA layer
+ the chunked linear mixers' own work (intra-chunk and state terms). Training = 3 x forward.
"""

from __future__ import annotations

import jax
from flax import nnx

from hylo_jax.models.hybrid import ModelSpec
from hylo_jax.sharding import path_keys

# bf16 dense peak FLOP/s by device kind (substring match, first hit wins).
PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("v6", 918e12),
              ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v4", 275e12))


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Nominal bf16 peak of a device, or None when unknown (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    return next((f for name, f in PEAK_FLOPS if name.lower() in kind.lower()), None)


def _matmul_params(spec: ModelSpec) -> int:
    model = nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        keys = [str(k) for k in path_keys(path)]
        if len(var.shape) == 2 and "embed_tokens" not in keys and "conv1d" not in keys[-2]:
            total += int(var.size)
    if spec.model.tie_word_embeddings:
        total += spec.model.vocab_size * spec.model.hidden_size
    return total


def forward_flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Model FLOPs of one forward pass per token at context `seq_len`."""
    cfg, hybrid = spec.model, spec.hybrid
    flops = 2.0 * _matmul_params(spec)
    for kind in spec.layer_kinds():
        if kind == "attention":
            flops += 2 * cfg.num_heads * 2 * cfg.head_dim * seq_len / 2
        elif kind == "mla":
            m = hybrid.mla
            flops += 2 * m.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) * seq_len / 2
        elif kind == "gdn":
            g, c = hybrid.gdn, hybrid.gdn.chunk_size
            flops += 2 * g.num_heads * (c * (g.head_k_dim + g.head_v_dim) + 2 * g.head_k_dim * g.head_v_dim)
        elif kind == "mamba2":
            m, c = hybrid.mamba2, hybrid.mamba2.chunk_size
            flops += 2 * m.num_heads * (c * (m.d_state + m.head_dim) + 2 * m.d_state * m.head_dim)
    return flops
