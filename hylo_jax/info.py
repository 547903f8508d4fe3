"""Model accounting without weights: parameters per component and decode-cache memory.

Cache per token and layer: GQA attention 2 * H_kv * d_head values, MLA kv_lora_rank +
qk_rope_head_dim, linear mixers none (a fixed-size state per sequence instead).
"""

from __future__ import annotations

from collections import Counter

from flax import nnx

from hylo_jax.models.hybrid import ModelSpec
from hylo_jax.sharding import path_keys

NAMES = {"embed_tokens": "embedding", "norm": "final norm", "input_layernorm": "layer norms",
         "post_attention_layernorm": "layer norms", "mlp": "mlp"}


def parameter_breakdown(spec: ModelSpec) -> dict[str, int]:
    """Parameter count per component (embedding, lm_head, mlp, norms, one entry per mixer kind)."""
    model = nnx.eval_shape(lambda: spec.build(nnx.Rngs(0)))
    kinds = spec.layer_kinds()
    counts: Counter[str] = Counter()
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        keys = path_keys(path)
        if keys[0] == "lm_head":
            name = "lm_head"
        elif keys[1] == "layers":
            name = NAMES.get(keys[3], f"mixer: {kinds[int(keys[2])]}")
        else:
            name = NAMES[keys[1]]
        counts[name] += int(var.size)
    return dict(counts)


def _mixers(spec: ModelSpec):
    hybrid = spec.hybrid
    for kind in spec.layer_kinds():
        yield kind, None if hybrid is None else {"mla": hybrid.mla, "gdn": hybrid.gdn,
                                                  "mamba2": hybrid.mamba2}.get(kind)


def cache_values_per_token(spec: ModelSpec) -> int:
    """Values cached per token over all layers (grows with the context)."""
    cfg, total = spec.model, 0
    for kind, mixer in _mixers(spec):
        if kind == "attention":
            total += 2 * cfg.num_kv_heads * cfg.head_dim
        elif kind == "mla":
            total += mixer.kv_lora_rank + mixer.qk_rope_head_dim
    return total


def state_values_per_sequence(spec: ModelSpec) -> int:
    """Values of the fixed-size recurrent states (conv + SSM / delta state) over all layers."""
    total = 0
    for kind, m in _mixers(spec):
        if kind == "gdn":
            conv = (m.conv_kernel - 1) * m.num_heads * (2 * m.head_k_dim + m.head_v_dim)
            total += m.num_heads * m.head_k_dim * m.head_v_dim + conv
        elif kind == "mamba2":
            total += m.num_heads * m.head_dim * m.d_state + (m.conv_kernel - 1) * m.conv_channels
    return total


def report(spec: ModelSpec, contexts=(8192, 65536, 1 << 20, 2 << 20), cache_bytes: int = 2) -> str:
    """A printable summary: parameters by component, cache per token and at `contexts` vs teacher."""
    teacher = ModelSpec(spec.model)
    lines = ["parameters:"]
    breakdown = parameter_breakdown(spec)
    for name, n in sorted(breakdown.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<20} {n:>15,}")
    lines.append(f"  {'total':<20} {sum(breakdown.values()):>15,}")
    kinds = Counter(spec.layer_kinds())
    lines.append("layers: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    per_token, teacher_per_token = cache_values_per_token(spec), cache_values_per_token(teacher)
    state = state_values_per_sequence(spec) * 4  # fp32 states
    lines.append(f"decode cache per token: {per_token * cache_bytes:,} B vs teacher "
                 f"{teacher_per_token * cache_bytes:,} B ({100 * per_token / teacher_per_token:.1f}%), "
                 f"plus {state / 2**20:.1f} MiB fixed recurrent state per sequence")
    for ctx in contexts:
        ours = (per_token * ctx * cache_bytes + state) / 2**30
        theirs = teacher_per_token * ctx * cache_bytes / 2**30
        lines.append(f"  context {ctx:>9,}: {ours:8.2f} GiB vs teacher {theirs:8.2f} GiB per sequence")
    return "\n".join(lines)
