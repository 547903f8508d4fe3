"""Rotary position embeddings (RoPE) with default, Llama-3 and YaRN frequency rules.

Layout is the Hugging Face one ("rotate half"): the pair of dimension i is i + d/2, so stored
weights need no permutation. x' = x * cos(p*w) + rotate_half(x) * sin(p*w), times YaRN's
attention factor.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from hylo_jax.config import RopeConfig


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's temperature correction 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(cfg: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies w_i (i < dim/2) and the cos/sin scale ("attention factor")."""
    # float32 throughout, as the reference implementations compute the frequencies.
    inv_freq = 1.0 / np.float32(cfg.theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    if cfg.type == "default":
        return inv_freq.astype(np.float32), 1.0
    if cfg.type == "llama3":
        orig = cfg.original_max_position_embeddings
        wavelen = np.float32(2 * math.pi) / inv_freq
        low_wavelen, high_wavelen = orig / cfg.low_freq_factor, orig / cfg.high_freq_factor
        smooth = (orig / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
        scaled = np.where(wavelen > low_wavelen, inv_freq / cfg.factor, inv_freq)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        smoothed = (1 - smooth) * inv_freq / cfg.factor + smooth * inv_freq
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if cfg.type == "yarn":
        return _yarn_frequencies(cfg, dim)
    raise ValueError(f"unknown rope type {cfg.type!r}")


def _yarn_frequencies(cfg: RopeConfig, dim: int) -> tuple[np.ndarray, float]:
    """YaRN (Peng et al. 2023): interpolate low frequencies, keep high ones, ramp in between."""
    pos_freqs = cfg.theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (cfg.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        orig = cfg.original_max_position_embeddings
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(cfg.theta))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 = extrapolate (keep the original frequency)
    inv_freq = interpolated * (1 - keep) + extrapolated * keep
    if cfg.attention_factor is not None:
        factor = cfg.attention_factor
    elif cfg.mscale and cfg.mscale_all_dim:
        factor = _yarn_mscale(cfg.factor, cfg.mscale) / _yarn_mscale(cfg.factor, cfg.mscale_all_dim)
    else:
        factor = _yarn_mscale(cfg.factor)
    return inv_freq.astype(np.float32), float(factor)


def yarn_softmax_scale(cfg: RopeConfig) -> float:
    """DeepSeek's extra softmax multiplier under YaRN: mscale(factor, mscale_all_dim)^2 (else 1)."""
    if cfg.type != "yarn" or not cfg.mscale_all_dim:
        return 1.0
    return _yarn_mscale(cfg.factor, cfg.mscale_all_dim) ** 2


def rope_cos_sin(
    positions: Int[Array, "b t"], cfg: RopeConfig, dim: int
) -> tuple[Float[Array, "b t d"], Float[Array, "b t d"]]:
    """cos and sin of p * w for each position, duplicated to width `dim`, in fp32."""
    inv_freq, scale = rope_frequencies(cfg, dim)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(
    x: Float[Array, "b t h d"], cos: Float[Array, "b t d"], sin: Float[Array, "b t d"]
) -> Float[Array, "b t h d"]:
    """Rotates each (i, i + d/2) pair of x by the position's angle; computed in fp32."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
