"""Basic NNX layers with logical-axis metadata: Linear, Embed, RMSNorm, SwiGLU MLP.

Conventions (docs/DESIGN.md): a Linear's `kernel` is [in, out] (the transpose of PyTorch's
`weight`), `bias` is [out]; Embed's `embedding` is [vocab, d]; RMSNorm's `scale` is [d].
Parameters are stored in `param_dtype`; computation runs in `dtype` with fp32 normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from hylo_jax.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str) -> jnp.dtype:
    return DTYPES[name]


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), kernel [in, out] annotated with logical `axes`."""

    def __init__(self, in_features: int, out_features: int, *, axes: tuple[str, str],
                 rngs: nnx.Rngs, use_bias: bool = False, dtype=jnp.float32,
                 param_dtype=jnp.float32, init_std: float | None = None):
        std = init_std if init_std is not None else in_features ** -0.5
        self.kernel = nnx.Param(
            std * jax.random.truncated_normal(rngs.params(), -2, 2, (in_features, out_features),
                                              param_dtype), logical_axes=axes)
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=axes[1:])
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: Float[Array, "... i"]) -> Float[Array, "... o"]:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table [vocab, d]; `attend` gives the tied LM head x @ table^T."""

    def __init__(self, vocab_size: int, features: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.embedding = nnx.Param(
            jax.random.normal(rngs.params(), (vocab_size, features), param_dtype) * 0.02,
            logical_axes=("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in fp32, returned in the input dtype."""

    def __init__(self, features: int, *, eps: float, rngs: nnx.Rngs | None = None,
                 param_dtype=jnp.float32, axes: Sequence[str] = ("norm",)):
        del rngs
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=tuple(axes))
        self.eps = eps

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Linear(hidden_size, intermediate_size, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(hidden_size, intermediate_size, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        return self.down_proj(h)
