"""Normalisation layers. Computed in float32 whatever the weights' dtype (a sum of squares in
bfloat16 loses most of its bits), returned in the input's dtype."""
from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp


class RMSNorm(hk.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * scale, without LayerNorm's mean
    subtraction and bias. Every family moecli loads so far uses it."""

    def __init__(self, dim: int, eps: float, name: str | None = None):
        super().__init__(name=name)
        self.dim, self.eps = dim, eps

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = hk.get_parameter("scale", [self.dim], init=jnp.ones)
        return (rms_normalize(x, self.eps, jnp.float32) * (scale.astype(jnp.float32) + self.offset)).astype(x.dtype)

    offset = 0.0  # added to the stored scale


class OffsetRMSNorm(RMSNorm):
    """RMSNorm whose checkpoint stores scale - 1, "zero-centred" (Qwen3-Next, Qwen3.5): x / rms(x) * (1 + w)."""

    offset = 1.0


def rms_normalize(x: jax.Array, eps: float, dtype=None) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32, returned in `dtype` (default: x's). Without
    a scale it is Llama-4's weightless q/k norm (transformers' `Llama4TextL2Norm`)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32.astype(dtype or x.dtype)


class LayerNorm(hk.Module):
    """LayerNorm (Ba et al. 2016): (x - mean) / std * scale + offset, in float32."""

    def __init__(self, dim: int, eps: float, name: str | None = None):
        super().__init__(name=name)
        self.dim, self.eps = dim, eps

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = hk.get_parameter("scale", [self.dim], init=jnp.ones)
        offset = hk.get_parameter("offset", [self.dim], init=jnp.zeros)
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        x32 = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32) + offset.astype(jnp.float32)).astype(x.dtype)


#: config.norm -> the module; a family picks one by name.
NORMS = {"rms": RMSNorm, "rms_offset": OffsetRMSNorm, "layer": LayerNorm}


def norm(kind: str, dim: int, eps: float, name: str) -> hk.Module:
    return NORMS[kind](dim, eps, name=name)
