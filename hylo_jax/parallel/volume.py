"""Communication volume of context parallelism, from the model's shapes (no devices needed).

Bytes each device receives for one row of `tokens` tokens split over `shards` sequence shards, in
one forward pass (`parallel.context` is the implementation counted here):

* attention layers: all-gather or ring, both move (S-1)/S * T * w values per layer, w the payload
  per token: the MLA latent (kv_lora_rank + qk_rope_head_dim) in HyLo, K and V (2 * kv_heads *
  head_dim) in a GQA teacher, or MLA's decompressed K/V if it were sent instead
  (kv_heads * (qk_nope + qk_rope + v_head_dim)). The ring sends the same bytes in S-1 messages of
  one block each, overlapped with compute, and holds one block instead of all of them;
* linear layers: all-gather of each shard's state summary (fp32): GDN H * dk * (dk + dv) (the
  [F | M] pair), Mamba2 H * (P * N + 1), independent of T; plus the conv halo, (K-1) inputs per
  conv channel from one neighbour.

A training step moves about 3x the forward volume with full remat (forward, recomputed forward,
and the backward pass's transposed collectives on the cotangents: reduce-scatter / reverse ring).
"""

from __future__ import annotations

import dataclasses

from hylo_jax.models.hybrid import ModelSpec


@dataclasses.dataclass(frozen=True)
class Row:
    layer: str
    count: int  # layers of this kind
    values_per_token: int  # attention payload per token (0 for linear)
    bytes_per_layer: float  # per device, one forward, one row


def context_volume(spec: ModelSpec, *, tokens: int, shards: int, dtype_bytes: int = 2) -> list[Row]:
    """Per layer kind of `spec`: bytes per device of one forward over one row (see the module doc)."""
    kinds = spec.layer_kinds()
    cfg, plan = spec.model, spec.hybrid
    rows = []
    gathered = (shards - 1) / shards * tokens
    if "attention" in kinds:
        w = 2 * cfg.num_kv_heads * cfg.head_dim
        rows.append(Row("attention (K/V gather)", kinds.count("attention"), w, gathered * w * dtype_bytes))
    if "mla" in kinds:
        m = plan.mla
        w = m.kv_lora_rank + m.qk_rope_head_dim
        rows.append(Row("MLA (latent gather / ring)", kinds.count("mla"), w, gathered * w * dtype_bytes))
        kv = m.num_kv_heads * (m.qk_head_dim + m.v_head_dim)
        rows.append(Row("MLA if K/V were gathered", 0, kv, gathered * kv * dtype_bytes))
    if "gdn" in kinds:
        g = plan.gdn
        state = g.num_heads * g.head_k_dim * (g.head_k_dim + g.head_v_dim) * 4
        halo = (g.conv_kernel - 1) * g.num_heads * (2 * g.head_k_dim + g.head_v_dim) * dtype_bytes
        rows.append(Row("GDN (state summaries + conv halo)", kinds.count("gdn"), 0,
                        (shards - 1) * state + halo))
    if "mamba2" in kinds:
        m = plan.mamba2
        state = m.num_heads * (m.head_dim * m.d_state + 1) * 4
        halo = (m.conv_kernel - 1) * m.conv_channels * dtype_bytes
        rows.append(Row("Mamba2 (state summaries + conv halo)", kinds.count("mamba2"), 0,
                        (shards - 1) * state + halo))
    return rows


def table(spec: ModelSpec, teacher: ModelSpec | None, *, tokens: int, shards: int, dtype_bytes: int = 2) -> str:
    """Markdown table of `context_volume` for the student and (optionally) its teacher."""
    lines = [f"Sequence split {shards}-way, {tokens:,} tokens per row, {dtype_bytes}-byte activations; "
             "bytes received per device, one forward pass of one row.",
             "",
             "| model | layer kind | layers | values/token | per layer | all layers |",
             "|---|---|---:|---:|---:|---:|"]
    for name, s in (("student", spec), ("teacher", teacher)):
        if s is None:
            continue
        total = 0.0
        for r in context_volume(s, tokens=tokens, shards=shards, dtype_bytes=dtype_bytes):
            total += r.count * r.bytes_per_layer
            layers = fmt_bytes(r.count * r.bytes_per_layer) if r.count else "-"
            lines.append(f"| {name} | {r.layer} | {r.count} | {r.values_per_token or '-'} | "
                         f"{fmt_bytes(r.bytes_per_layer)} | {layers} |")
        lines.append(f"| {name} | **total** | | | | **{fmt_bytes(total)}** |")
    return "\n".join(lines)


def fmt_bytes(b: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"
