"""The MoE transformer: embeddings, n_layers pre-norm decoder layers, a final norm, the LM head.

Each decoder layer is  x = x + attn(norm(x));  x = x + ffn(norm(x))  (pre-norm residual blocks, as
in every model family moecli loads), where ffn is the MoE block or, on the layers the config marks
dense, a plain SwiGLU MLP.

Parameters live in Haiku's tree under these module paths (what `moecli.checkpoints.families` maps checkpoint
tensors onto):
    transformer/embed/embeddings                    [vocab, d_model]
    transformer/layer_{i}/input_norm/scale          [d_model]
    transformer/layer_{i}/attn/{q,k,v,o}_proj/w,b   [in, out]
    transformer/layer_{i}/attn/{q,k}_norm/scale
    transformer/layer_{i}/post_attn_norm/scale
    transformer/layer_{i}/moe/router, w_gate, w_up, w_down   [d, e], [e, d, f], [e, d, f], [e, f, d]
    transformer/layer_{i}/moe/shared_expert/{gate,up,down}_proj/w, .../moe/shared_expert_gate/w
    transformer/layer_{i}/mlp/{gate,up,down}_proj/w
    transformer/final_norm/scale,  transformer/lm_head  [d_model, vocab] (absent when tied)
"""
from __future__ import annotations

from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from moecli.model.config import ModelConfig
from moecli.model.layers import MLP, Attention, LayerCache, RMSNorm, matmul
from moecli.model.moe import MoEBlock, Routing


class Cache(NamedTuple):
    """The KV cache of every layer plus `pos`, how many positions are filled (int32 scalar)."""

    layers: tuple[LayerCache, ...]
    pos: jax.Array


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
    keys = (batch, config.n_kv_heads, config.head_dim, max_len)     # see LayerCache
    values = (batch, config.n_kv_heads, max_len, config.head_dim)
    layers = tuple(LayerCache(jnp.zeros(keys, dtype), jnp.zeros(values, dtype))
                   for _ in range(config.n_layers))
    return Cache(layers, jnp.zeros((), jnp.int32))


class DecoderLayer(hk.Module):
    def __init__(self, config: ModelConfig, index: int, mesh=None):
        super().__init__(name=f"layer_{index}")
        self.c, self.index, self.mesh = config, index, mesh

    def __call__(self, x, positions, cache, cache_pos, disabled=None, keep=None):
        """With `keep` (an int32 position), returns only that position's output [batch, 1, d]:
        every token's keys and values still enter the cache (and every token is routed), but the
        feed-forward block runs for the kept token alone (see `Transformer`)."""
        c = self.c
        with jax.named_scope("attention"):
            h = RMSNorm(c.d_model, c.norm_eps, name="input_norm")(x)
            h, cache = Attention(c, self.index)(h, positions, cache, cache_pos)
            x = x + h
        h = RMSNorm(c.d_model, c.norm_eps, name="post_attn_norm")(x)
        routing = None
        if c.moe_layers[self.index]:
            with jax.named_scope("moe"):
                h, routing = MoEBlock(c, self.mesh)(h, disabled, keep)  # routes every token
        else:
            if keep is not None:
                h = jax.lax.dynamic_slice_in_dim(h, keep, 1, axis=1)
            with jax.named_scope("mlp"):
                h = MLP(c.d_model, c.d_ff, name="mlp")(h)
        if keep is not None:
            x = jax.lax.dynamic_slice_in_dim(x, keep, 1, axis=1)           # [batch, 1, d_model]
        return x + h, cache, routing


class Transformer(hk.Module):
    """ids [batch, seq] -> float32 logits [batch, seq, vocab], the new cache, and per-MoE-layer
    routing. Without a cache this is the full causal forward over positions 0..seq-1; with one,
    the tokens sit at positions cache.pos.. and their keys/values are written into the cache.
    `expert_mask` (bool [n_moe_layers, n_experts], True = switched off) ablates experts.
    `logits_at` (an int32 scalar) computes logits for that one position only: a prefill needs just
    the last prompt token's, and the LM head over every position can cost as much as the layers.
    The last layer then also runs its feed-forward block for that position alone (as llama.cpp
    does): the other tokens need only their keys and values, which attention has already written.
    That is 1/n_layers of a prompt's expert work, exactly the same logits. Not with capacity
    routing, where whether a token's assignment fits depends on every token's."""

    def __init__(self, config: ModelConfig, mesh=None):
        super().__init__(name="transformer")
        self.c, self.mesh = config, mesh  # mesh: experts spread over devices (moecli.model.sharding)

    def __call__(self, ids: jax.Array, cache: Cache | None = None, expert_mask: jax.Array | None = None,
                 logits_at: jax.Array | None = None):
        c = self.c
        embed = hk.Embed(c.vocab_size, c.d_model, name="embed")
        x = embed(ids)                                                    # [batch, seq, d_model]
        start = jnp.zeros((), jnp.int32) if cache is None else cache.pos
        positions = start + jnp.arange(ids.shape[1], dtype=jnp.int32)   # [seq]
        new_layers, routings = [], []
        trim = logits_at is not None and c.capacity_factor == 0
        for i in range(c.n_layers):
            layer_cache = None if cache is None else cache.layers[i]
            disabled = None if expert_mask is None else expert_mask[len(routings)]
            keep = logits_at if trim and i == c.n_layers - 1 else None
            x, layer_cache, routing = DecoderLayer(c, i, self.mesh)(x, positions, layer_cache, start, disabled, keep)
            new_layers.append(layer_cache)
            if routing is not None:
                routings.append(routing)
        if logits_at is not None and not trim:
            x = jax.lax.dynamic_slice_in_dim(x, logits_at, 1, axis=1)    # [batch, 1, d_model]
        x = RMSNorm(c.d_model, c.norm_eps, name="final_norm")(x)
        if c.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, embed.embeddings, preferred_element_type=jnp.float32)
        else:
            head = hk.get_parameter("lm_head", [c.d_model, c.vocab_size], x.dtype,
                                    init=hk.initializers.TruncatedNormal(c.d_model ** -0.5))
            logits = matmul(x, head, jnp.float32)
        new_cache = None if cache is None else Cache(tuple(new_layers), start + ids.shape[1])
        return logits, new_cache, stack_routing(routings)


def stack_routing(routings: list[Routing]) -> Routing | None:
    """Per-layer Routing -> one Routing with a leading [n_moe_layers] axis."""
    if not routings:
        return None
    return Routing(*(jnp.stack(parts) for parts in zip(*routings)))


def transformed(config: ModelConfig, mesh=None) -> hk.Transformed:
    """The pure functions init(rng, ids, cache) and apply(params, ids, cache, expert_mask)."""
    return hk.without_apply_rng(hk.transform(
        lambda ids, cache=None, expert_mask=None, logits_at=None:
        Transformer(config, mesh)(ids, cache, expert_mask, logits_at)))
