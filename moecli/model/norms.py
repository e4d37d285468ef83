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
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


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
NORMS = {"rms": RMSNorm, "layer": LayerNorm}


def norm(kind: str, dim: int, eps: float, name: str) -> hk.Module:
    return NORMS[kind](dim, eps, name=name)
