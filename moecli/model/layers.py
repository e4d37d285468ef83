"""The transformer's building blocks: RMSNorm, rotary embeddings, grouped-query attention with a
KV cache, and the SwiGLU MLP. The Mixture-of-Experts block lives in `moecli.model.moe`.

Numerics: norms, rotary embeddings, attention scores and the attention softmax run in float32
whatever the weights' dtype; bfloat16 keeps too few mantissa bits (8) for a sum of squares or a
softmax over thousands of keys. Matmul inputs stay in the weights' dtype.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from moecli.model.config import ModelConfig, RopeConfig


def matmul(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """x [..., k] @ w [k, n], returned in `out_dtype` (default: x's). On CPU through the hand-written
    kernels in `moecli.kernels.cpu.ffi`: decoding as matrix-vector products (XLA:CPU streams float32
    weights ~20% slower, and converts bfloat16 ones to a float32 copy in memory first, ~20x
    slower), a prompt as a packed matrix product (~1.2x XLA's float32 dot one after another; with
    bfloat16 weights on AMX tiles or AVX512-BF16 where the CPU has them, ~2x XLA's bfloat16 dot)."""
    from moecli.kernels.cpu import ffi as cpu_kernels

    out_dtype = out_dtype or x.dtype
    kernel = None
    if w.dtype in (jnp.float32, jnp.bfloat16) and cpu_kernels.on():
        kernel = cpu_kernels.matvec if cpu_kernels.use_for(math.prod(x.shape[:-1])) else cpu_kernels.matmul
    if kernel is None:
        return jnp.matmul(x, w, preferred_element_type=out_dtype)
    reference = lambda x, w: jnp.matmul(x, w, preferred_element_type=x.dtype)  # noqa: E731
    return cpu_kernels.with_reference_gradient(kernel, reference)(x, w).astype(out_dtype)


class Linear(hk.Module):
    """y = x @ w (+ b) through `matmul`, with hk.Linear's parameters ("w" [in, out], "b" [out])
    and initialiser, so checkpoints map onto it the same way."""

    def __init__(self, output_size: int, with_bias: bool = True, name: str | None = None):
        super().__init__(name=name)
        self.output_size, self.with_bias = output_size, with_bias

    def __call__(self, x: jax.Array) -> jax.Array:
        d_in = x.shape[-1]
        w = hk.get_parameter("w", [d_in, self.output_size], x.dtype,
                             init=hk.initializers.TruncatedNormal(1.0 / np.sqrt(d_in)))
        y = matmul(x, w)
        if self.with_bias:
            y = y + hk.get_parameter("b", [self.output_size], x.dtype, init=jnp.zeros)
        return y


class RMSNorm(hk.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): x / rms(x) * scale, without LayerNorm's mean
    subtraction and bias. Computed in float32, returned in the input's dtype."""

    def __init__(self, dim: int, eps: float, name: str | None = None):
        super().__init__(name=name)
        self.dim, self.eps = dim, eps

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = hk.get_parameter("scale", [self.dim], init=jnp.ones)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32)).astype(x.dtype)


# ----------------------------------------------------------------------------- rotary embeddings

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


def _unfused(fn, x):
    """fn(x), computed on its own rather than fused into its consumers. XLA:CPU fuses elementwise
    producers into every consumer: RoPE's sin and cos [seq, d] were evaluated again for every head
    of q and k (~8 ms of a 512-token prompt's layer on 2 cores, 6% of the prompt). XLA fuses
    nothing across a conditional's boundary, and a predicate it cannot fold keeps the conditional
    (on CPU `optimization_barrier` is removed before fusion)."""
    flat = x.reshape(-1)
    return jax.lax.cond(flat[0] == flat[0], fn, fn, x)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scale: float) -> jax.Array:
    """Rotate x [batch, seq, heads, head_dim] by its tokens' positions [seq], in float32."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [seq, d/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]           # [1, seq, 1, d]
    cos, sin = _unfused(lambda a: (jnp.cos(a) * scale, jnp.sin(a) * scale), angles)
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


# ----------------------------------------------------------------------------- attention

class LayerCache(NamedTuple):
    """One layer's KV cache, preallocated to a fixed length so shapes never change.

    KV caching: during generation each new token attends to every earlier token, whose keys and
    values do not change; storing them makes a decode step cost O(context) instead of
    re-running the whole prefix. The write position is an array (in `moecli.model.transformer.Cache`), not a
    Python int, so every decode step has the same shapes and compiles once.
    """

    # Laid out so both attention products are plain [rows, inner] x [inner, cols] matrix products
    # per head, read in place: scores = q @ k ([head_dim, max_len]), out = probs @ v. With keys as
    # [max_len, head_dim] rows, XLA:CPU transposed the whole key cache on every decode step.
    k: jax.Array  # [batch, kv_heads, head_dim, max_len]
    v: jax.Array  # [batch, kv_heads, max_len, head_dim]


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
    """Causal mask [q, k]: a query sees keys at or before its own position (and, with a sliding
    window, fewer than `window` positions back)."""
    visible = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        visible &= k_pos[None, :] > q_pos[:, None] - window
    return visible


def attention_product(a: jax.Array, b: jax.Array, seq: int) -> jax.Array:
    """a [batch, kv, group, t, inner] @ b [batch, kv, inner, cols] per head, in float32: q @ keys
    (inner = head_dim) or probs @ values (inner = positions). For one decoding token (t = 1) as a
    broadcast multiply and a sum over `inner`, which XLA fuses into one pass over the cache: as a
    dot, XLA:CPU copied the whole cache into another layout on every step. Longer chunks use a
    dot in the cache's dtype (bf16 on accelerators), accumulated in float32."""
    if seq == 1:
        return jnp.sum(a.astype(jnp.float32)[..., None] * b.astype(jnp.float32)[:, :, None, None], axis=-2)
    return jnp.einsum("bkgti,bkic->bkgtc", a.astype(b.dtype), b, preferred_element_type=jnp.float32)


def attend_xla(q, k, v, positions, window: int | None) -> jax.Array:
    """softmax(q k / sqrt(head_dim), causal mask) v as XLA ops: q [b, kv, group, t, d] at `positions`
    [t], keys [b, kv, d, len] and values [b, kv, len, d] at positions 0..len-1 -> float32 [b, kv, group, t, d]."""
    scores = attention_product(q, k, q.shape[3]) / math.sqrt(q.shape[-1])
    mask = attention_mask(positions, jnp.arange(k.shape[-1]), window)  # [t, len]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)     # [b, kv, group, t, len]
    return attention_product(jax.nn.softmax(scores, axis=-1), v, q.shape[3])


def attend(q, k, v, positions, window: int | None) -> jax.Array:
    """`attend_xla`'s result; on CPU from the hand-written kernel in `moecli.kernels.cpu.ffi`, which
    visits only the keys each query may see (XLA's version computes and masks the whole cache:
    ~2x the work for a prompt, and all of max_len for every decoded token)."""
    from moecli.kernels.cpu import ffi as cpu_kernels

    if not cpu_kernels.on():
        return attend_xla(q, k, v, positions, window)
    kernel = lambda q, k, v, positions: cpu_kernels.attention(  # noqa: E731
        q.astype(jnp.float32) / math.sqrt(q.shape[-1]), k, v, positions[0], window)
    reference = lambda q, k, v, positions: attend_xla(q, k, v, positions, window)  # noqa: E731
    return cpu_kernels.with_reference_gradient(kernel, reference)(q, k, v, positions)


class Attention(hk.Module):
    """Grouped-query attention (Ainslie et al. 2023, "GQA") with RoPE and an optional KV cache.

    n_heads query heads share n_kv_heads key/value heads in groups of n_heads // n_kv_heads
    (query head h reads kv head h // group). GQA shrinks the KV cache by that factor; MQA
    (Shazeer 2019) is the extreme n_kv_heads = 1, and n_kv_heads = n_heads is plain multi-head.
    Optional extras from the checkpoint families: q/k RMSNorm per head (Qwen3) or over the whole
    projection (OLMoE), and clipping q, k, v to [-clip_qkv, clip_qkv] (OLMoE).
    """

    def __init__(self, config: ModelConfig, layer: int, name: str = "attn"):
        super().__init__(name=name)
        self.c, self.window = config, (config.sliding_window if config.uses_window(layer) else None)

    def __call__(self, x, positions, cache: LayerCache | None, cache_pos):
        c = self.c
        batch, seq, _ = x.shape
        group = c.n_heads // c.n_kv_heads
        q = Linear(c.n_heads * c.head_dim, with_bias=c.qkv_bias, name="q_proj")(x)
        k = Linear(c.n_kv_heads * c.head_dim, with_bias=c.qkv_bias, name="k_proj")(x)
        v = Linear(c.n_kv_heads * c.head_dim, with_bias=c.qkv_bias, name="v_proj")(x)
        if c.qk_norm == "full":
            q = RMSNorm(q.shape[-1], c.norm_eps, name="q_norm")(q)
            k = RMSNorm(k.shape[-1], c.norm_eps, name="k_norm")(k)
        if c.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q = q.reshape(batch, seq, c.n_heads, c.head_dim)
        k = k.reshape(batch, seq, c.n_kv_heads, c.head_dim)
        v = v.reshape(batch, seq, c.n_kv_heads, c.head_dim)
        if c.qk_norm == "head":
            q = RMSNorm(c.head_dim, c.norm_eps, name="q_norm")(q)
            k = RMSNorm(c.head_dim, c.norm_eps, name="k_norm")(k)
        inv_freq, scale = rope_frequencies(c.head_dim, c.rope)
        q, k = apply_rope(q, positions, inv_freq, scale), apply_rope(k, positions, inv_freq, scale)

        k, v = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)         # [b, kv, d, t], [b, kv, t, d]
        if cache is not None:  # write this chunk at cache_pos, then attend over the whole (fixed-size) cache
            cache = LayerCache(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, 0, 0, cache_pos)),
                               jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, 0, cache_pos, 0)))
            k, v = cache.k, cache.v                                       # [b, kv, d, s], [b, kv, s, d]
        # Keys sit at positions 0..len-1: the cache's slots, or without a cache this chunk (from 0).
        q = q.reshape(batch, seq, c.n_kv_heads, group, c.head_dim)       # [b, t, kv, group, d]
        out = attend(q.transpose(0, 2, 3, 1, 4), k, v, positions, self.window)
        out = out.transpose(0, 3, 1, 2, 4)                               # [b, t, kv, group, d]
        out = out.reshape(batch, seq, c.n_heads * c.head_dim)
        out = out.astype(x.dtype)  # a float32 cache (on CPU) must not turn the residual stream float32
        return Linear(c.d_model, with_bias=c.o_bias, name="o_proj")(out), cache


class MLP(hk.Module):
    """SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer"):
    down(silu(gate(x)) * up(x)). Used for dense layers and for Qwen2-MoE's shared expert."""

    def __init__(self, d_model: int, d_hidden: int, name: str = "mlp"):
        super().__init__(name=name)
        self.d_model, self.d_hidden = d_model, d_hidden

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = Linear(self.d_hidden, with_bias=False, name="gate_proj")(x)
        up = Linear(self.d_hidden, with_bias=False, name="up_proj")(x)
        return Linear(self.d_model, with_bias=False, name="down_proj")(jax.nn.silu(gate) * up)
