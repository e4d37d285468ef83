"""Attention kinds. Each is a Haiku module `(x, positions, cache, cache_pos) -> (out, cache)` with a
cache type of its own (`moecli.model.cache`); `moecli.model.parts.ATTENTION` names them for the
families. The scores, softmax and RoPE run in float32; projections in the weights' dtype."""
from __future__ import annotations

from typing import NamedTuple

import haiku as hk
import jax.numpy as jnp

from moecli.model.cache import KVCache
from moecli.model.config import ModelConfig
from moecli.model.linear import Linear
from moecli.model.mla import LatentCache, MultiHeadLatentAttention
from moecli.model.norms import norm
from moecli.model.ops import Ops
from moecli.model.rope import apply_rope, rope_frequencies


class GroupedQueryAttention(hk.Module):
    """Grouped-query attention (Ainslie et al. 2023, "GQA") with RoPE and a KV cache.

    n_heads query heads share n_kv_heads key/value heads in groups of n_heads // n_kv_heads
    (query head h reads kv head h // group). GQA shrinks the KV cache by that factor; MQA
    (Shazeer 2019) is the extreme n_kv_heads = 1, and n_kv_heads = n_heads is plain multi-head.
    Options from the checkpoint families: biases on q/k/v (and o); q/k norm per head (Qwen3,
    "QK-norm") or over the whole projection (OLMoE); clipping q, k, v to [-clip_qkv, clip_qkv]
    (OLMoE); a sliding window on the layers the config marks (Mistral, Qwen2); RoPE on only the first
    `rotary_dim` dimensions of each head (partial rotary: GLM-4.5, MiniMax-M2; `moecli.model.rope`);
    a learned sink logit per query head in each softmax's denominator (gpt-oss: `attention_sinks`,
    see `moecli.model.ops.softmax_with_sinks`).
    """

    def __init__(self, config: ModelConfig, layer: int, ops: Ops, name: str = "attn"):
        super().__init__(name=name)
        self.c, self.ops = config, ops
        self.window = config.sliding_window if config.uses_window(layer) else None

    def __call__(self, x, positions, cache: KVCache | None, cache_pos):
        c, ops = self.c, self.ops
        batch, seq, _ = x.shape
        group = c.n_heads // c.n_kv_heads
        q = Linear(c.n_heads * c.head_dim, ops, with_bias=c.qkv_bias, quant=c.quant, name="q_proj")(x)
        k = Linear(c.n_kv_heads * c.head_dim, ops, with_bias=c.qkv_bias, quant=c.quant, name="k_proj")(x)
        v = Linear(c.n_kv_heads * c.head_dim, ops, with_bias=c.qkv_bias, quant=c.quant, name="v_proj")(x)
        if c.qk_norm == "full":
            q = norm(c.norm, q.shape[-1], c.norm_eps, name="q_norm")(q)
            k = norm(c.norm, k.shape[-1], c.norm_eps, name="k_norm")(k)
        if c.clip_qkv is not None:
            q, k, v = (jnp.clip(t, -c.clip_qkv, c.clip_qkv) for t in (q, k, v))
        q = q.reshape(batch, seq, c.n_heads, c.head_dim)
        k = k.reshape(batch, seq, c.n_kv_heads, c.head_dim)
        v = v.reshape(batch, seq, c.n_kv_heads, c.head_dim)
        if c.qk_norm == "head":
            q = norm(c.norm, c.head_dim, c.norm_eps, name="q_norm")(q)
            k = norm(c.norm, c.head_dim, c.norm_eps, name="k_norm")(k)
        inv_freq, scale = rope_frequencies(c.rotary_dim or c.head_dim, c.rope)  # partial rotary: fewer pairs
        q = apply_rope(q, positions, inv_freq, scale, ops.isolate)
        k = apply_rope(k, positions, inv_freq, scale, ops.isolate)

        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)           # [b, kv, t, d]
        if cache is not None:  # write this chunk at cache_pos, then attend over the whole (fixed-size) cache
            cache = cache.write(k, v, cache_pos, ops.keys_transposed)
            k, v = cache.k, cache.v
        elif ops.keys_transposed:
            k = k.swapaxes(2, 3)                                          # [b, kv, d, t]
        # Keys sit at positions 0..len-1: the cache's slots, or without a cache this chunk (from 0).
        q = q.reshape(batch, seq, c.n_kv_heads, group, c.head_dim).transpose(0, 2, 3, 1, 4)  # [b, kv, g, t, d]
        sinks = None
        if c.attention_sinks:  # query head h = kv * group + g, as q is grouped above
            sinks = hk.get_parameter("sinks", [c.n_heads], jnp.float32, init=jnp.zeros).reshape(c.n_kv_heads, group)
        out = ops.attention(q, k, v, positions, self.window, sinks=sinks)  # float32 [b, kv, g, t, d]
        out = out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, c.n_heads * c.head_dim)
        out = out.astype(x.dtype)  # a float32 cache must not turn the residual stream float32
        return Linear(c.d_model, ops, with_bias=c.o_bias, quant=c.quant, name="o_proj")(out), cache


class AttentionKind(NamedTuple):
    module: type   # the Haiku module: (config, layer, ops) -> (x, positions, cache, cache_pos) -> (out, cache)
    cache: type    # its per-layer cache: .empty(config, layer, batch, max_len, dtype, keys_transposed)


#: config.attention -> the attention module and its cache type; a family picks one by name.
ATTENTION = {"gqa": AttentionKind(GroupedQueryAttention, KVCache),
             "mla": AttentionKind(MultiHeadLatentAttention, LatentCache)}  # DeepSeek-V2/V3: moecli.model.mla
