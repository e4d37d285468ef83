"""Multi-head latent attention (MLA; DeepSeek-AI 2024, "DeepSeek-V2"), and its cache of latents.

Keys and values are not projected per head from each token. One down-projection (`kv_a_proj`)
compresses the token to a latent c [kv_lora_rank], RMS-normalised, plus one RoPE key k_rope
[qk_rope_head_dim] that every head shares ("decoupled RoPE": position cannot pass through the
up-projection below, so it travels in a part of its own). Per head h, the up-projection
`kv_b_proj` = [W_uk | W_uv] gives k_nope_h = c W_uk_h and v_h = c W_uv_h. Queries are
[q_nope_h, q_rope_h] per head, through a low-rank bottleneck (q_a_proj, RMSNorm, q_b_proj) when
`q_lora_rank` is set. Scores are q_nope.k_nope + q_rope.k_rope, times head_dim^-0.5 (and YaRN's
mscale squared, `MLAConfig.softmax_mscale`).

The cache (`LatentCache`) holds only [c, k_rope] per token: kv_lora_rank + qk_rope_head_dim values
for all heads (576 in DeepSeek-V3, against 2 x 128 heads x 128 or more for its keys and values
expanded), which is what MLA is for. Decoding never expands it ("absorbing" the up-projection):
q_nope_h . (c W_uk_h) = (q_nope_h W_uk_h^T) . c, so W_uk moves into the query, a query in latent
space; attention then runs over the cached latents themselves, as multi-query attention with one
"head" of kv_lora_rank + qk_rope_head_dim that all query heads share, and W_uv is applied to the
weighted sum of latents, per head, before o_proj. A chunk long enough that expanding keys and values
per head costs less (`absorbs`; every full forward, most prompts) computes the textbook form
instead. Both are the same function of the weights; the tests check they give the same numbers.
"""
from __future__ import annotations

from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from moecli.model.cache import write_at
from moecli.model.config import MLAConfig, ModelConfig
from moecli.model.linear import Linear
from moecli.model.norms import norm
from moecli.model.ops import Ops
from moecli.model.quant import dense, get_weight
from moecli.model.rope import apply_rope, rope_frequencies


class LatentCache(NamedTuple):
    """One layer's MLA cache: per position, the normalised latent c and the rotated shared key k_rope,
    concatenated, [batch, 1, max_len, kv_lora_rank + qk_rope_head_dim]; or [batch, 1, width, max_len]
    where the backend keeps keys transposed (`Ops.keys_transposed`): these are the keys of absorbed
    attention, and their first kv_lora_rank rows its values."""

    kv: jax.Array

    @classmethod
    def empty(cls, config: ModelConfig, layer: int, batch: int, max_len: int, dtype, keys_transposed: bool):
        width = config.mla.kv_lora_rank + config.mla.qk_rope_head_dim
        return cls(jnp.zeros((batch, 1, width, max_len) if keys_transposed else (batch, 1, max_len, width), dtype))

    def write(self, latent: jax.Array, pos: jax.Array, keys_transposed: bool) -> "LatentCache":
        """This chunk's latents [batch, 1, t, width] stored at positions pos..pos+t-1."""
        return LatentCache(write_at(self.kv, latent, pos, keys_transposed))

    def latents(self, keys_transposed: bool) -> jax.Array:
        """Every position's latent, [batch, 1, max_len, width], whichever layout the cache keeps."""
        return self.kv.swapaxes(2, 3) if keys_transposed else self.kv


def absorbs(m: MLAConfig, seq: int) -> bool:
    """Whether `seq` new tokens attending over a cache cost less absorbed than expanded. Per query
    token, head and cached position, absorbed attention multiplies 2 kv_lora_rank + qk_rope_head_dim
    numbers (scores over the latent and the RoPE key, then the weighted sum of latents), expanded
    attention qk_nope + qk_rope + v_head_dim; but expanding first costs kv_lora_rank x (qk_nope +
    v_head_dim) per head and cached position, whatever `seq` is. (Absorbing W_uk into the queries
    and applying W_uv after cost the same, per new token, as expanding that token would.)"""
    extra = 2 * m.kv_lora_rank + m.qk_rope_head_dim - (m.qk_nope_head_dim + m.qk_rope_head_dim) - m.v_head_dim
    return extra <= 0 or seq * extra < m.kv_lora_rank * (m.qk_nope_head_dim + m.v_head_dim)


class LatentUpProjection(hk.Module):
    """kv_b_proj's weight [kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim)], as a Linear layer
    stores it, for the products a Linear cannot compute (the absorbed ones, per head)."""

    def __init__(self, config: ModelConfig, name: str = "kv_b_proj"):
        super().__init__(name=name)
        self.c = config

    def __call__(self, dtype):
        m, h = self.c.mla, self.c.n_heads
        shape = [m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim)]
        return get_weight("w", shape, dtype, hk.initializers.TruncatedNormal(1.0 / np.sqrt(shape[0])), self.c.quant)


class MultiHeadLatentAttention(hk.Module):
    """MLA (see the module docstring): (x, positions, cache, cache_pos) -> (out, cache), as every
    attention kind. Causal, without a sliding window; projections in the weights' dtype, RoPE, the
    norms, the scores and the softmax in float32."""

    def __init__(self, config: ModelConfig, layer: int, ops: Ops, name: str = "attn"):
        super().__init__(name=name)
        self.c, self.ops = config, ops

    def __call__(self, x, positions, cache: LatentCache | None, cache_pos):
        c, m, ops = self.c, self.c.mla, self.ops
        batch, seq, _ = x.shape
        r, nope = m.kv_lora_rank, m.qk_nope_head_dim
        if m.q_lora_rank:
            q = Linear(m.q_lora_rank, ops, with_bias=c.qkv_bias, quant=c.quant, name="q_a_proj")(x)
            q = norm(c.norm, m.q_lora_rank, m.norm_eps, name="q_a_norm")(q)
            q = Linear(c.n_heads * c.head_dim, ops, with_bias=False, quant=c.quant, name="q_b_proj")(q)
        else:
            q = Linear(c.n_heads * c.head_dim, ops, with_bias=False, quant=c.quant, name="q_proj")(x)
        q = q.reshape(batch, seq, c.n_heads, c.head_dim)
        kv = Linear(r + m.qk_rope_head_dim, ops, with_bias=c.qkv_bias, quant=c.quant, name="kv_a_proj")(x)
        latent = norm(c.norm, r, m.norm_eps, name="kv_a_norm")(kv[..., :r])          # [b, t, r]

        inv_freq, rope_scale = rope_frequencies(m.qk_rope_head_dim, c.rope)
        q_rope = apply_rope(q[..., nope:], positions, inv_freq, rope_scale, ops.isolate, m.rope_interleave)
        k_rope = apply_rope(kv[:, :, None, r:], positions, inv_freq, rope_scale, ops.isolate, m.rope_interleave)
        latent = jnp.concatenate([latent, k_rope[:, :, 0]], axis=-1)[:, None]       # [b, 1, t, r + rope]
        w = LatentUpProjection(c)(x.dtype)
        scale = c.head_dim ** -0.5 * m.softmax_mscale
        if cache is not None:
            cache = cache.write(latent, cache_pos, ops.keys_transposed)
        if cache is not None and absorbs(m, seq):
            out = self.absorbed(q[..., :nope], q_rope, cache, w, positions, scale)
        else:
            every = latent if cache is None else cache.latents(ops.keys_transposed)
            out = self.expanded(q[..., :nope], q_rope, every.astype(x.dtype), w, positions, scale)
        out = out.astype(x.dtype)  # a float32 cache must not turn the residual stream float32
        return Linear(c.d_model, ops, with_bias=c.o_bias, quant=c.quant, name="o_proj")(out), cache

    def expanded(self, q_nope, q_rope, latent, w, positions, scale):
        """The textbook form: every position's keys and values up-projected per head from its latent
        [b, 1, len, r + rope], then attention as plain multi-head attention. Returns [b, t, h * v]."""
        m, ops = self.c.mla, self.ops
        batch, seq, h, nope = q_nope.shape
        length, r = latent.shape[2], m.kv_lora_rank
        kv = ops.matmul(latent[:, 0, :, :r], w).reshape(batch, length, h, nope + m.v_head_dim)  # [b, len, h, n + v]
        k_rope = jnp.broadcast_to(latent[:, 0, :, None, r:], (batch, length, h, m.qk_rope_head_dim))
        k = jnp.concatenate([kv[..., :nope], k_rope], axis=-1).transpose(0, 2, 1, 3)  # [b, h, len, qk]
        v = kv[..., nope:].transpose(0, 2, 1, 3)                                     # [b, h, len, v]
        if ops.keys_transposed:
            k = k.swapaxes(2, 3)                                                     # [b, h, qk, len]
        q = jnp.concatenate([q_nope, q_rope], axis=-1).transpose(0, 2, 1, 3)[:, :, None]  # [b, h, 1, t, qk]
        out = ops.attention(q, k, v, positions, None, scale=scale)                  # float32 [b, h, 1, t, v]
        return out[:, :, 0].transpose(0, 2, 1, 3).reshape(batch, seq, h * m.v_head_dim)

    def absorbed(self, q_nope, q_rope, cache: LatentCache, w, positions, scale):
        """Attention over the cached latents themselves: W_uk folded into the queries, W_uv applied
        after the weighted sum (see the module docstring). Returns [b, t, h * v]."""
        m, ops = self.c.mla, self.ops
        batch, seq, h, nope = q_nope.shape
        r = m.kv_lora_rank
        w = dense(w, q_nope.dtype).reshape(r, h, nope + m.v_head_dim)               # [r, h, n + v]
        q_latent = jnp.einsum("bthn,rhn->bthr", q_nope, w[..., :nope], preferred_element_type=jnp.float32)
        q = jnp.concatenate([q_latent, q_rope.astype(jnp.float32)], axis=-1)        # [b, t, h, r + rope]
        q = q.transpose(0, 2, 1, 3)[:, None]                                         # [b, 1, h, t, r + rope]
        values = cache.latents(ops.keys_transposed)[..., :r]                         # [b, 1, len, r]
        out = ops.attention(q, cache.kv, values, positions, None, scale=scale)      # float32 [b, 1, h, t, r]
        out = jnp.einsum("bhtr,rhv->bthv", out[:, 0].astype(w.dtype), w[..., nope:],
                         preferred_element_type=jnp.float32)                         # [b, t, h, v]
        return out.reshape(batch, seq, h * m.v_head_dim)
