"""Rotary position embeddings (RoPE) and their context-extension variants, in float32."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from moecli.model.config import RopeConfig


def rope_frequencies(head_dim: int, rope: RopeConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies theta^(-2i/d) for each pair of dimensions, and the cos/sin scale.

    RoPE (Su et al. 2021, "RoFormer") encodes position p by rotating each pair of query/key
    dimensions by the angle p * inv_freq[i], so q.k depends only on the distance between tokens.
    Context-extension variants rescale the frequencies: "linear" divides every position by
    `factor` (Chen et al. 2023); "yarn" (Peng et al. 2023) interpolates only the low
    frequencies, keeps the high ones, and scales cos/sin by an attention factor.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.kind == "default":
        return inv_freq, 1.0
    if rope.kind == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.kind == "yarn":
        def correction_dim(rotations: float) -> float:
            return head_dim * math.log(rope.original_max_positions / (rotations * 2 * math.pi)) / (
                2 * math.log(rope.theta))

        low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        high = high + 0.001 if low == high else high
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        keep = 1.0 - ramp  # 1 = keep the original (extrapolate), 0 = interpolate
        inv_freq = (inv_freq / rope.factor) * (1 - keep) + inv_freq * keep
        return inv_freq.astype(np.float32), rope.attention_factor
    raise ValueError(f"unsupported rope kind {rope.kind!r}")


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] over the last axis: transformers' "rotate-half" RoPE layout, which
    pairs dimension i with i + d/2 (not 2i with 2i+1 as in the RoFormer paper)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scale: float, isolate) -> jax.Array:
    """Rotate x [batch, seq, heads, head_dim] by its tokens' positions [seq], in float32 (bf16 angles
    lose whole rotations at long positions). `isolate` is the backend's `Ops.isolate`: cos and sin
    are computed once for all heads where the backend's compiler would recompute them per head."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [seq, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]           # [1, seq, 1, d]
    cos, sin = isolate(lambda a: (jnp.cos(a) * scale, jnp.sin(a) * scale), angles)
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)
