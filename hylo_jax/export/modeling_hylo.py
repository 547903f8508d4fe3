"""PyTorch HyLo hybrid exported by hylo_jax: `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`. Copied beside the weights; needs only torch and transformers.

The model is the teacher's decoder (Llama / Qwen2 / Qwen3: RMSNorm, SwiGLU MLP, RoPE) where layer
i's mixer is `config.mixer_types[i]`:
  attention  the teacher's GQA attention (Qwen2 q/k/v bias, Qwen3 per-head q/k RMSNorm)
  mla        multi-head latent attention, num_kv_heads up-projection heads, latent decode cache
  mamba2     Mamba2 with HyLo's GQA shape (x and B heads repeated to all heads after the conv)
  gdn        Gated DeltaNet (delta rule with decay, l2-normalised q/k, per-head gated RMSNorm)
The maths and parameter names are hylo_jax's (hylo_jax/models/*.py), in [batch, time, heads, dim]
layout. Recurrent mixers run plain PyTorch chunked algorithms, or the `fla` / `mamba_ssm` kernels
when they are installed and the tensors are on a GPU. `generate()` uses `HyloCache`.
Padding is not supported (recurrent states cannot skip pad tokens): give unpadded prompts.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_hylo import HyloConfig

try:  # optional GPU kernels
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule
except ImportError:
    fla_chunk_gated_delta_rule = None
try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:
    mamba_chunk_scan_combined = None


# ------------------------------------------------------------------------------------------------
# RoPE ("rotate half" layout): x' = x cos(p w) + rotate_half(x) sin(p w), times an attention factor.

def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(rope: dict, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies w_i (i < dim/2) and the cos/sin scale, for rope_type default/llama3/yarn."""
    kind, theta = rope.get("rope_type", "default"), float(rope.get("rope_theta", 10000.0))
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    inv_freq = 1.0 / torch.tensor(theta, dtype=torch.float32) ** exponents
    factor = float(rope.get("factor", 1.0))
    orig = rope.get("original_max_position_embeddings", 8192)
    if kind == "default":
        return inv_freq, 1.0
    if kind == "llama3":
        low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
        wavelen = 2 * math.pi / inv_freq
        smooth = (orig / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= orig / high) & (wavelen <= orig / low)
        return torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled), 1.0
    if kind == "yarn":
        def correction_dim(rotations: float) -> float:
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        lo, hi = correction_dim(rope.get("beta_fast", 32.0)), correction_dim(rope.get("beta_slow", 1.0))
        if rope.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        hi = hi + 0.001 if lo == hi else hi
        keep = 1 - torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
        inv_freq = inv_freq / factor * (1 - keep) + inv_freq * keep
        mscale, mscale_all = rope.get("mscale", 1.0), rope.get("mscale_all_dim", 0.0)
        if rope.get("attention_factor") is not None:
            scale = rope["attention_factor"]
        elif mscale and mscale_all:
            scale = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            scale = _yarn_mscale(factor)
        return inv_freq, float(scale)
    raise ValueError(f"rope_type {kind!r} is not supported (default, llama3, yarn)")


def yarn_softmax_scale(rope: dict) -> float:
    """DeepSeek's softmax multiplier under YaRN: mscale(factor, mscale_all_dim)^2 (else 1)."""
    if rope.get("rope_type") != "yarn" or not rope.get("mscale_all_dim"):
        return 1.0
    return _yarn_mscale(rope.get("factor", 1.0), rope["mscale_all_dim"]) ** 2


def rope_cos_sin(rope: dict, dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [t, dim] (fp32) of positions [t]."""
    inv_freq, scale = rope_frequencies(rope, dim)
    angles = positions.float()[:, None] * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates each (i, i + d/2) pair of x [b, t, h, d] (fp32 maths)."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Shared blocks.

class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (fp32 maths)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, d: int, inner: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, inner, bias=False), nn.Linear(d, inner, bias=False)
        self.down_proj = nn.Linear(inner, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v, causal, fp32. q [b, t, h, d]; k, v [b, s, g, *] with g | h (query head
    i reads key head i // (h / g)); the t queries are the last t of the s positions."""
    t, s, h, g = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = k.repeat_interleave(h // g, dim=2), v.repeat_interleave(h // g, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * scale
    visible = torch.arange(s, device=q.device)[None, :] <= torch.arange(s - t, s, device=q.device)[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("bhts,bshd->bthd", probs, v.float()).to(q.dtype)


def causal_conv(u: torch.Tensor, prefix: torch.Tensor, conv: nn.Conv1d) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv y_t = bias + sum_k w[k] u_{t-K+1+k} over [prefix ; u] (fp32), and the last
    K-1 inputs (the next call's prefix). u [b, t, c], prefix [b, K-1, c]."""
    window = torch.cat([prefix.to(u.dtype), u], dim=1)
    bias = None if conv.bias is None else conv.bias.float()
    y = F.conv1d(window.float().transpose(1, 2), conv.weight.float(), bias, groups=window.shape[-1])
    return y.transpose(1, 2), window[:, window.shape[1] - prefix.shape[1]:]


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sum(x^2) + 1e-6) over the last axis."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """S[..., i, j] = sum_{j < k <= i} a_k for j <= i, -inf above the diagonal (masked cumsum, exact)."""
    n = a.shape[-1]
    x = a[..., :, None].expand(*a.shape, n).masked_fill(~torch.ones(n, n, dtype=torch.bool, device=a.device)
                                                          .tril(-1), 0.0)
    s = x.cumsum(-2)
    return s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=a.device).tril(), float("-inf"))


# ------------------------------------------------------------------------------------------------
# Decode cache.

class HyloCache(Cache):
    """Per-layer decode state: attention (keys, values) [b, s, g, d]; MLA latents [b, s, r + dr]
    (normed c_KV ; rotated k_rope); Mamba2 (conv inputs, ssm state [b, h, p, n]); GDN (q, k, v conv
    inputs, delta-rule state [b, h, dk, dv])."""

    is_compileable = False

    def __init__(self, num_layers: int):
        super().__init__(layers=[])
        self.states = [None] * num_layers
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        def pick(x):
            return tuple(pick(y) for y in x) if isinstance(x, tuple) else x.index_select(0, beam_idx.to(x.device))

        self.states = [None if s is None else pick(s) for s in self.states]


# ------------------------------------------------------------------------------------------------
# Mixers. Each: forward(x [b, t, d], positions [t], state) -> (y, new state); state None = empty.

class HyloAttention(nn.Module):
    """The teacher's grouped-query attention with RoPE (+ q/k/v bias, + per-head q/k RMSNorm)."""

    def __init__(self, config: HyloConfig):
        super().__init__()
        d, hd, h, g = config.hidden_size, config.head_dim, config.num_attention_heads, config.num_key_value_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(d, h * hd, bias=bias)
        self.k_proj, self.v_proj = nn.Linear(d, g * hd, bias=bias), nn.Linear(d, g * hd, bias=bias)
        self.o_proj = nn.Linear(h * hd, d, bias=False)
        if config.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(hd, config.rms_norm_eps), RMSNorm(hd, config.rms_norm_eps)
        self.qk_norm, self.heads, self.kv_heads, self.head_dim = config.qk_norm, h, g, hd
        self.rope = config.rope_parameters or {}

    def forward(self, x, positions, state):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_cos_sin(self.rope, self.head_dim, positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is not None:
            k, v = torch.cat([state[0], k], 1), torch.cat([state[1], v], 1)
        out = causal_attention(q, k, v, self.head_dim ** -0.5)
        return self.o_proj(out.reshape(b, t, -1)), (k, v)


class HyloMLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3; HyLo: g = num_kv_heads up-projection heads):
    c_Q = [norm](W_DQ x), [q_nope ; q_rope]_i = (W_UQ c_Q)_i (or W_Q x); [c ; k_rope] = W_DKV x,
    c = [norm](c), [k_nope ; v]_g = (W_UKV c)_g; k_rope is shared by all heads; softmax scale
    (dn + dr)^-1/2 times YaRN's mscale^2. The cache holds [c ; rope(k_rope)] per token; one-token
    decode folds W_UK into the query and W_UV into the output (absorbed form)."""

    def __init__(self, config: HyloConfig):
        super().__init__()
        c = config.mla
        d, h, g, eps = config.hidden_size, config.num_attention_heads, c["num_kv_heads"], c["rms_norm_eps"]
        self.dn, self.dr, self.dv, self.r = (c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"],
                                             c["kv_lora_rank"])
        q_width = h * (self.dn + self.dr)
        self.q_lora = c["q_lora_rank"] > 0
        if self.q_lora:
            self.q_a_proj = nn.Linear(d, c["q_lora_rank"], bias=False)
            self.q_a_layernorm = RMSNorm(c["q_lora_rank"], eps) if c["latent_norm"] else nn.Identity()
            self.q_b_proj = nn.Linear(c["q_lora_rank"], q_width, bias=False)
        else:
            self.q_proj = nn.Linear(d, q_width, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.r + self.dr, bias=False)
        self.kv_a_layernorm = RMSNorm(self.r, eps) if c["latent_norm"] else nn.Identity()
        self.kv_b_proj = nn.Linear(self.r, g * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(h * self.dv, d, bias=False)
        self.heads, self.kv_heads, self.rope = h, g, c["rope_parameters"]
        self.scale = (self.dn + self.dr) ** -0.5 * yarn_softmax_scale(self.rope)

    def forward(self, x, positions, state):
        b, t, _ = x.shape
        cos, sin = rope_cos_sin(self.rope, self.dr, positions)
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(b, t, self.heads, self.dn + self.dr)
        q_nope, q_rope = q[..., :self.dn], apply_rope(q[..., self.dn:], cos, sin)
        c, k_rope = self.kv_a_proj_with_mqa(x).split([self.r, self.dr], -1)
        k_rope = apply_rope(k_rope[:, :, None], cos, sin)[:, :, 0]
        latent = torch.cat([self.kv_a_layernorm(c), k_rope], -1)
        if state is not None:
            latent = torch.cat([state, latent], 1)
        w = self.kv_b_proj.weight.view(self.kv_heads, self.dn + self.dv, self.r)
        w_uk, w_uv = w[:, :self.dn], w[:, self.dn:]
        if state is not None and t == 1:
            out = self._absorbed(q_nope, q_rope, latent, w_uk, w_uv)
        else:
            c_all, k_rope_all = latent[..., :self.r], latent[..., self.r:]
            k_nope = torch.einsum("bsr,gnr->bsgn", c_all, w_uk)
            v = torch.einsum("bsr,gvr->bsgv", c_all, w_uv)
            k = torch.cat([k_nope, k_rope_all[:, :, None].expand(-1, -1, self.kv_heads, -1)], -1)
            out = causal_attention(torch.cat([q_nope, q_rope], -1), k, v, self.scale)
        return self.o_proj(out.reshape(b, t, -1)), latent

    def _absorbed(self, q_nope, q_rope, latent, w_uk, w_uv):
        """One query token against every cached latent: q_i . k_gj = [q_nope_i W_UK_g^T ; q_rope_i] .
        latent_j, o_i = (sum_j p_ij c_j) W_UV_g (no causal mask: every cached token is earlier)."""
        b, t, h, _ = q_nope.shape
        g = self.kv_heads
        q_lat = torch.einsum("btgqn,gnr->btgqr", q_nope.reshape(b, t, g, h // g, self.dn), w_uk)
        q_abs = torch.cat([q_lat, q_rope.reshape(b, t, g, h // g, self.dr)], -1)
        probs = (torch.einsum("btgql,bsl->bgqts", q_abs.float(), latent.float()) * self.scale).softmax(-1)
        o_lat = torch.einsum("bgqts,bsr->btgqr", probs, latent[..., :self.r].float())
        return torch.einsum("btgqr,gvr->btgqv", o_lat, w_uv.float()).reshape(b, t, h, self.dv).to(q_nope.dtype)


class GatedRMSNorm(nn.Module):
    """y = weight * g / sqrt(mean_group(g^2) + eps), g = x * silu(z), over groups of `group` channels."""

    def __init__(self, size: int, group: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group, self.eps = group, eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = x.float() * F.silu(z.float())
        grouped = g.view(*g.shape[:-1], -1, self.group)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (grouped.view(g.shape) * self.weight.float()).to(x.dtype)


def ssd_chunked(x, dt, A, B, C, state, chunk: int):
    """Mamba2 scan h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t, chunk by chunk (fp32).
    x [b, t, h, p], dt [b, t, h] (discretised), A [h], B/C [b, t, h, n], state [b, h, p, n].
    In a chunk, with a = dt A: y_i = sum_{j<=i} (C_i . B_j) e^{sum_{j<k<=i} a_k} dt_j x_j
    + e^{sum_{k<=i} a_k} state C_i; the state moves to the chunk end likewise."""
    ys = []
    for start in range(0, x.shape[1], chunk):
        xc, dtc, Bc, Cc = (v[:, start:start + chunk] for v in (x, dt, B, C))
        a = (dtc * A).transpose(1, 2)  # [b, h, l]
        decay = torch.exp(segsum(a))  # [b, h, i, j]
        xdt = xc * dtc[..., None]
        y = torch.einsum("bihn,bjhn,bhij,bjhp->bihp", Cc, Bc, decay, xdt)
        from_start = torch.exp(a.cumsum(-1))  # [b, h, l]
        y = y + torch.einsum("bihn,bhpn->bihp", Cc, state) * from_start.transpose(1, 2)[..., None]
        to_end = decay[:, :, -1, :].transpose(1, 2)[..., None]  # [b, l, h, 1]
        state = from_start[..., -1, None, None] * state + torch.einsum("bjhn,bjhp->bhpn", Bc, xdt * to_end)
        ys.append(y)
    return torch.cat(ys, 1), state


class HyloMamba2(nn.Module):
    """Mamba2 mixer: [z ; x B C ; dt] = in_proj(u), causal conv + silu on [x B C], SSD scan with
    A = -exp(A_log), dt = clip(softplus(dt + dt_bias)), y + D x, gated RMSNorm with z, out_proj.
    GQA-shaped when num_xb_heads > 0: x and B have num_xb_heads heads, each repeated to
    num_heads / num_xb_heads consecutive heads after the conv; C has n_groups groups."""

    def __init__(self, config: HyloConfig):
        super().__init__()
        c = config.mamba2
        self.h, self.p, self.n, self.groups = c["num_heads"], c["head_dim"], c["d_state"], c["n_groups"]
        self.xb_heads = c["num_xb_heads"] or self.h
        self.b_groups = c["num_xb_heads"] or self.groups
        d_inner = self.h * self.p
        self.channels = self.xb_heads * self.p + (self.b_groups + self.groups) * self.n
        self.in_proj = nn.Linear(config.hidden_size, d_inner + self.channels + self.h, bias=c["use_bias"])
        self.conv1d = nn.Conv1d(self.channels, self.channels, c["conv_kernel"], groups=self.channels,
                                bias=c["use_conv_bias"])
        self.dt_bias, self.A_log, self.D = (nn.Parameter(torch.zeros(self.h)) for _ in range(3))
        self.norm = GatedRMSNorm(d_inner, c["norm_group_size"] or d_inner // self.groups, c["norm_eps"])
        self.out_proj = nn.Linear(d_inner, config.hidden_size, bias=c["use_bias"])
        self.chunk, self.dt_limit, self.kernel = c["chunk_size"], tuple(c["dt_limit"]), c["conv_kernel"]

    def forward(self, x, positions, state):
        b, t, _ = x.shape
        h, p, n = self.h, self.p, self.n
        z, u, dt = self.in_proj(x).split([h * p, self.channels, h], -1)
        if state is None:
            state = (x.new_zeros(b, self.kernel - 1, self.channels), x.new_zeros(b, h, p, n, dtype=torch.float32))
        u, conv_state = causal_conv(u, state[0], self.conv1d)
        xs, B, C = F.silu(u).split([self.xb_heads * p, self.b_groups * n, self.groups * n], -1)
        xs = xs.reshape(b, t, self.xb_heads, p).repeat_interleave(h // self.xb_heads, 2)
        B = B.reshape(b, t, self.b_groups, n).repeat_interleave(h // self.b_groups, 2)
        C = C.reshape(b, t, self.groups, n).repeat_interleave(h // self.groups, 2)
        A = -torch.exp(self.A_log.float())
        if mamba_chunk_scan_combined is not None and x.is_cuda and t > 1:
            y, ssm = mamba_chunk_scan_combined(xs, dt, A, B, C, self.chunk, dt_bias=self.dt_bias.float(),
                                               dt_softplus=True, dt_limit=self.dt_limit, initial_states=state[1],
                                               return_final_states=True)
            y = y.float()
        else:
            dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)
            y, ssm = ssd_chunked(xs, dt, A, B, C, state[1], self.chunk)
        y = y + self.D.float()[:, None] * xs
        out = self.out_proj(self.norm(y.reshape(b, t, h * p).to(x.dtype), z))
        return out, (conv_state, ssm)


def gated_delta_chunked(q, k, v, g, beta, state, chunk: int):
    """Gated delta rule S_t = e^{g_t} (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T, o_t = S_t^T q_t,
    chunk by chunk (fp32; q, k already l2-normalised, q scaled). [b, h, t, *] layout; state [b, h, dk, dv].
    In a chunk with cumulative log-decay G: T = (I + tril(beta_i k_i.k_j e^{G_i - G_j}, -1))^{-1},
    u = T (beta v), w = T (beta k e^G), delta = u - w S0;
    o_i = e^{G_i} q_i S0 + sum_{j<=i} e^{G_i - G_j} (q_i . k_j) delta_j;
    S = e^{G_C} S0 + sum_j e^{G_C - G_j} k_j delta_j^T."""
    outs = []
    for start in range(0, q.shape[2], chunk):
        qc, kc, vc, gc, bc = (x[:, :, start:start + chunk] for x in (q, k, v, g, beta))
        n = qc.shape[2]
        G = gc.cumsum(-1)
        decay = torch.exp(segsum(gc))  # e^{G_i - G_j} for j <= i, else 0
        strict = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
        m = (bc[..., None] * (kc @ kc.transpose(-1, -2)) * decay).masked_fill(~strict, 0.0)
        eye = torch.eye(n, device=q.device, dtype=q.dtype)
        rhs = torch.cat([bc[..., None] * vc, bc[..., None] * kc * G.exp()[..., None]], -1)
        uw = torch.linalg.solve_triangular(eye + m, rhs, upper=False, unitriangular=True)
        u, w = uw[..., :vc.shape[-1]], uw[..., vc.shape[-1]:]
        delta = u - w @ state
        outs.append(G.exp()[..., None] * (qc @ state) + ((qc @ kc.transpose(-1, -2)) * decay) @ delta)
        state = G[..., -1, None, None].exp() * state + (kc * decay[..., -1, :, None]).transpose(-1, -2) @ delta
    return torch.cat(outs, 2), state


class HyloGatedDeltaNet(nn.Module):
    """Gated DeltaNet: q, k, v = silu(conv(x W)), beta = sigmoid(x W_b), g = -exp(A_log) softplus(x W_a +
    dt_bias), o = gated delta rule(l2norm q, l2norm k, v), y = (RMSNorm(o_h) * silu(x W_g)_h) W_o."""

    def __init__(self, config: HyloConfig):
        super().__init__()
        c = config.gdn
        d, h, self.dk = config.hidden_size, c["num_heads"], c["head_k_dim"]
        self.dv, self.h, self.chunk, self.kernel = round(c["expand_v"] * self.dk), h, c["chunk_size"], c["conv_kernel"]
        kd, vd = h * self.dk, h * self.dv
        self.q_proj, self.k_proj = nn.Linear(d, kd, bias=False), nn.Linear(d, kd, bias=False)
        self.v_proj, self.g_proj = nn.Linear(d, vd, bias=False), nn.Linear(d, vd, bias=False)
        self.a_proj, self.b_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (
            nn.Conv1d(w, w, self.kernel, groups=w, bias=False) for w in (kd, kd, vd))
        self.A_log, self.dt_bias = nn.Parameter(torch.zeros(h)), nn.Parameter(torch.zeros(h))
        self.o_norm = RMSNorm(self.dv, c["norm_eps"])
        self.o_proj = nn.Linear(vd, d, bias=False)

    def forward(self, x, positions, state):
        b, t, _ = x.shape
        h = self.h
        if state is None:
            widths = (h * self.dk, h * self.dk, h * self.dv)
            state = (*(x.new_zeros(b, self.kernel - 1, w) for w in widths),
                     x.new_zeros(b, h, self.dk, self.dv, dtype=torch.float32))
        q, q_conv = causal_conv(self.q_proj(x), state[0], self.q_conv1d)
        k, k_conv = causal_conv(self.k_proj(x), state[1], self.k_conv1d)
        v, v_conv = causal_conv(self.v_proj(x), state[2], self.v_conv1d)
        q, k = (F.silu(a).view(b, t, h, self.dk) for a in (q, k))
        v = F.silu(v).view(b, t, h, self.dv)
        beta = torch.sigmoid(self.b_proj(x).float())
        g = -torch.exp(self.A_log.float()) * F.softplus(self.a_proj(x).float() + self.dt_bias.float())
        if fla_chunk_gated_delta_rule is not None and x.is_cuda:
            o, s = fla_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state[3], output_final_state=True,
                                              use_qk_l2norm_in_kernel=True)
        else:
            q, k = l2norm(q) * self.dk ** -0.5, l2norm(k)
            o, s = gated_delta_chunked(*(a.transpose(1, 2) for a in (q, k, v, g, beta)), state[3], self.chunk)
            o = o.transpose(1, 2)
        gate = F.silu(self.g_proj(x).float()).view(b, t, h, self.dv)
        o = (self.o_norm(o.float()) * gate).to(x.dtype)
        return self.o_proj(o.reshape(b, t, -1)), (q_conv, k_conv, v_conv, s)


MIXERS = {"attention": ("self_attn", HyloAttention), "mla": ("self_attn", HyloMLA),
          "mamba2": ("linear_attn", HyloMamba2), "gdn": ("linear_attn", HyloGatedDeltaNet)}


# ------------------------------------------------------------------------------------------------
# The model.

class HyloDecoderLayer(nn.Module):
    """x + mixer(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: HyloConfig, kind: str):
        super().__init__()
        if kind not in MIXERS:
            raise ValueError(f"unknown mixer type {kind!r}; this file implements {sorted(MIXERS)}")
        self.mixer_name, mixer_cls = MIXERS[kind]
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        setattr(self, self.mixer_name, mixer_cls(config))
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, positions, state):
        mixed, state = getattr(self, self.mixer_name)(self.input_layernorm(x), positions, state)
        x = x + mixed
        return x + self.mlp(self.post_attention_layernorm(x)), state


class HyloPreTrainedModel(PreTrainedModel):
    config_class = HyloConfig
    base_model_prefix = "model"
    _no_split_modules = ["HyloDecoderLayer"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own HyloCache


class HyloModel(HyloPreTrainedModel):
    """Embedding, decoder layers, final RMSNorm."""

    def __init__(self, config: HyloConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HyloDecoderLayer(config, kind) for kind in config.mixer_types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor, cache: HyloCache | None = None) -> torch.Tensor:
        """Final hidden states of input_ids [b, t], continuing `cache` (updated in place) if given."""
        start = 0 if cache is None else cache.seen
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x, state = layer(x, positions, None if cache is None else cache.states[i])
            if cache is not None:
                cache.states[i] = state
        if cache is not None:
            cache.seen += input_ids.shape[1]
        return self.norm(x)


class HyloForCausalLM(HyloPreTrainedModel, GenerationMixin):
    """HyloModel plus the LM head (the embedding matrix when tie_word_embeddings); fp32 logits."""

    def __init__(self, config: HyloConfig):
        super().__init__(config)
        self.model = HyloModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                past_key_values: HyloCache | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        """Logits of input_ids [b, t] (the last `logits_to_keep` positions when > 0). Positions follow
        the cache; `position_ids` and other generate() extras are not used."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("HyLo models do not support padding (attention_mask with zeros): recurrent "
                             "layers cannot skip pad tokens; run unpadded prompts one at a time")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = HyloCache(self.config.num_hidden_layers)
        hidden = self.model(input_ids, past_key_values)
        hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        head = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        logits = F.linear(hidden, head).float()
        return CausalLMOutputWithPast(logits=logits, past_key_values=past_key_values if use_cache else None)


__all__ = ["HyloCache", "HyloForCausalLM", "HyloModel", "HyloPreTrainedModel"]
