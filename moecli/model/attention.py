"""Attention kinds. Each is a Haiku module `(x, positions, cache, cache_pos) -> (out, cache)` with a
cache type of its own (`moecli.model.cache`); `moecli.model.parts.ATTENTION` names them for the
families. The scores, softmax and RoPE run in float32; projections in the weights' dtype."""
from __future__ import annotations

from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from moecli.model.cache import KVCache
from moecli.model.config import ModelConfig
from moecli.model.deltanet import DeltaNetCache, GatedDeltaNet
from moecli.model.linear import Linear
from moecli.model.mla import LatentCache, MultiHeadLatentAttention
from moecli.model.norms import norm, rms_normalize
from moecli.model.ops import Ops
from moecli.model.rope import apply_rope, query_temperature, rope_frequencies


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
    see `moecli.model.ops.softmax_with_sinks`). Llama-4: RoPE on the layers `rope_layers` marks, chunked
    attention (`moecli.model.ops.attention_mask`) on those `chunk_layers` marks, a weightless q/k norm on
    the RoPE layers (qk_norm "l2") and a position-dependent query temperature on the others
    (`moecli.model.rope.query_temperature`). Hunyuan-A13B: the per-head q/k norm, with weights, after RoPE
    (qk_norm "head_after_rope").
    """

    def __init__(self, config: ModelConfig, layer: int, ops: Ops, name: str = "attn"):
        super().__init__(name=name)
        self.c, self.ops = config, ops
        self.window = config.sliding_window if config.uses_window(layer) else None
        self.chunk = config.attention_chunk if config.uses_chunk(layer) else None
        self.rope = config.uses_rope(layer)

    def __call__(self, x, positions, cache: KVCache | None, cache_pos):
        c, ops = self.c, self.ops
        batch, seq, _ = x.shape
        group = c.n_heads // c.n_kv_heads
        q = Linear(c.n_heads * c.head_dim * (2 if c.attn_output_gate else 1), ops, with_bias=c.qkv_bias,
                   quant=c.quant, name="q_proj")(x)
        gate = None
        if c.attn_output_gate:  # Qwen3-Next: each head's q_proj rows are [query (head_dim), gate (head_dim)]
            q, gate = jnp.split(q.reshape(batch, seq, c.n_heads, 2 * c.head_dim), 2, axis=-1)
            q, gate = q.reshape(batch, seq, -1), gate.reshape(batch, seq, -1)
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
        if c.qk_norm == "l2" and self.rope:  # Llama-4, after RoPE there: the same, a rotation keeps each head's norm
            q, k = rms_normalize(q, c.norm_eps), rms_normalize(k, c.norm_eps)
        if self.rope:
            inv_freq, scale = rope_frequencies(c.rotary_dim or c.head_dim, c.rope)  # partial rotary: fewer pairs
            q = apply_rope(q, positions, inv_freq, scale, ops.isolate, c.rope_interleave)  # ERNIE-4.5: pairs (2i, 2i + 1)
            k = apply_rope(k, positions, inv_freq, scale, ops.isolate, c.rope_interleave)
        elif c.temperature_floor:  # [1 or batch, t, 1, 1]
            t = query_temperature(positions, c.temperature_floor, c.temperature_scale).reshape(-1, seq, 1, 1)
            q = (q.astype(jnp.float32) * t).astype(q.dtype)
        if c.qk_norm == "head_after_rope":  # Hunyuan-A13B: per head, with weights, after RoPE
            q = norm(c.norm, c.head_dim, c.norm_eps, name="q_norm")(q)
            k = norm(c.norm, c.head_dim, c.norm_eps, name="k_norm")(k)

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
        # scale: Granite's attention_multiplier, else None (1 / sqrt(head_dim))
        out = ops.attention(q, k, v, positions, self.window, sinks=sinks, scale=c.attention_scale,
                            chunk=self.chunk)                             # float32 [b, kv, g, t, d]
        out = out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, c.n_heads * c.head_dim)
        if gate is not None:  # the output gate, sigmoid in float32
            out = out * jax.nn.sigmoid(gate.astype(jnp.float32))
        out = out.astype(x.dtype)  # a float32 cache must not turn the residual stream float32
        return Linear(c.d_model, ops, with_bias=c.o_bias, quant=c.quant, name="o_proj")(out), cache


class AttentionKind(NamedTuple):
    module: type   # the Haiku module: (config, layer, ops) -> (x, positions, cache, cache_pos) -> (out, cache)
    cache: type    # its per-layer cache: .empty(config, layer, batch, max_len, dtype, keys_transposed)


#: config.attention -> the attention module and its cache type; a family picks one by name.
ATTENTION = {"gqa": AttentionKind(GroupedQueryAttention, KVCache),
             "mla": AttentionKind(MultiHeadLatentAttention, LatentCache),  # DeepSeek-V2/V3: moecli.model.mla
             "deltanet": AttentionKind(GatedDeltaNet, DeltaNetCache)}  # Qwen3-Next, Qwen3.5: moecli.model.deltanet
