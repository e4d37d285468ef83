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
    frequencies, keeps the high ones, and scales cos/sin by an attention factor; "llama3" (Meta's
    Llama 3.1, also Llama-4) divides the frequencies of wavelengths longer than
    original / low_freq_factor by `factor`, keeps those shorter than original / high_freq_factor, and
    blends linearly (in original / wavelength) between them; "longrope" (Ding et al. 2024, "LongRoPE";
    Phi-3, Phi-3.5-MoE) divides each frequency by its own searched factor and scales cos/sin.
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
    if rope.kind == "llama3":
        wavelen = 2 * math.pi / inv_freq
        old = rope.original_max_positions
        smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        blended = (1 - smooth) * inv_freq / rope.factor + smooth * inv_freq
        scaled = np.where(wavelen > old / rope.low_freq_factor, inv_freq / rope.factor, inv_freq)
        medium = (wavelen >= old / rope.high_freq_factor) & (wavelen <= old / rope.low_freq_factor)
        return np.where(medium, blended, scaled).astype(np.float32), 1.0
    if rope.kind == "longrope":
        assert len(rope.factors) == len(inv_freq), "longrope: one factor per frequency (checked by the family)"
        return (inv_freq / np.asarray(rope.factors, np.float32)).astype(np.float32), rope.attention_factor
    raise ValueError(f"unsupported rope kind {rope.kind!r}")


def query_temperature(positions: jax.Array, floor: float, scale: float) -> jax.Array:
    """Llama-4's attention-temperature tuning on its layers without RoPE ("NoPE"): the queries at position
    p are times 1 + scale * log(1 + floor((p + 1) / floor)), float32 [seq]. Softmax over ever more keys
    flattens; growing the logits with log(context) keeps it peaked (Nakanishi 2025, "Scalable-Softmax Is
    Superior for Attention", arXiv 2501.19399), in steps of `floor` positions."""
    steps = jnp.floor((positions.astype(jnp.float32) + 1.0) / floor)
    return jnp.log1p(steps) * scale + 1.0


def rotate_half(x: jax.Array) -> jax.Array:
    """[x1, x2] -> [-x2, x1] over the last axis: transformers' "rotate-half" RoPE layout, which
    pairs dimension i with i + d/2 (not 2i with 2i+1 as in the RoFormer paper)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rotate_pairs(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE in the RoFormer paper's layout, as DeepSeek's latent attention lays it out: dimensions 2i and
    2i + 1 form pair i, rotated in place by angle i. x [batch, seq, heads, d], cos/sin [1, seq, 1, d/2]."""
    x32 = x.astype(jnp.float32)
    even, odd = x32[..., 0::2], x32[..., 1::2]                                       # [b, t, h, d/2]
    return jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1).reshape(x.shape).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scale: float, isolate,
               interleaved: bool = False) -> jax.Array:
    """Rotate x [batch, seq, heads, head_dim] by its tokens' positions [seq] (or [batch, seq]), in float32 (bf16 angles
    lose whole rotations at long positions). `isolate` is the backend's `Ops.isolate`: cos and sin
    are computed once for all heads where the backend's compiler would recompute them per head.

    Partial rotary (GPT-NeoX; GLM-4.5, MiniMax-M2): when `inv_freq` covers fewer dimensions than the
    head (rotary_dim = 2 * len(inv_freq) < head_dim), only each head's first rotary_dim dimensions
    are rotated, rotate-half within them, and the rest carry no position at all (as transformers'
    `apply_rotary_pos_emb` splits q[..., :rotary_dim] from q[..., rotary_dim:]).

    `interleaved` (DeepSeek-V2/V3's `rope_interleave`, whole heads only): pairs (2i, 2i + 1) rather than
    (i, i + d/2), `rotate_pairs`. Queries and keys rotated alike give the same scores whether the
    rotated pairs are written back in place (here, and DeepSeek-V2's complex product) or evens first
    (transformers' DeepSeek-V3)."""
    rotary = 2 * len(inv_freq)
    rows = positions.astype(jnp.float32).reshape(-1, positions.shape[-1])           # [1 or batch, seq]
    angles = rows[..., None] * jnp.asarray(inv_freq)                                 # [1 or b, seq, r/2]
    if interleaved:
        assert rotary == x.shape[-1], "interleaved RoPE rotates whole heads"
        return rotate_pairs(x, *isolate(lambda a: (jnp.cos(a) * scale, jnp.sin(a) * scale), angles[:, :, None]))
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]              # [1 or b, seq, 1, r]
    cos, sin = isolate(lambda a: (jnp.cos(a) * scale, jnp.sin(a) * scale), angles)
    x32 = x.astype(jnp.float32)
    if rotary == x.shape[-1]:
        return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)
    rot, rest = x32[..., :rotary], x32[..., rotary:]                                 # [b, t, h, r], [b, t, h, d - r]
    return jnp.concatenate([rot * cos + rotate_half(rot) * sin, rest], axis=-1).astype(x.dtype)
