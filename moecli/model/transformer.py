"""The MoE transformer: embeddings, n_layers pre-norm decoder layers, a final norm, the LM head.

Each decoder layer is  x = x + attn(norm(x));  x = x + ffn(norm(x))  (pre-norm residual blocks, as
in every model family moecli loads), where ffn is the MoE block or, on the layers the config marks
dense, a plain SwiGLU MLP. IBM Granite scales these by constant multipliers (muP-style, Yang et al.
2021, "Tensor Programs V"): the embeddings, each residual branch and the logits (`scaled`).

Parameters live in Haiku's tree under these module paths (what `moecli.checkpoints.families` maps checkpoint
tensors onto):
    transformer/embed/embeddings                    [vocab, d_model]
    transformer/layer_{i}/input_norm/scale          [d_model]
    transformer/layer_{i}/attn/{q,k,v,o}_proj/w,b   [in, out]
    transformer/layer_{i}/attn/{q,k}_norm/scale
    transformer/layer_{i}/post_attn_norm/scale
    transformer/layer_{i}/attn/sinks                [n_heads] (gpt-oss)
    transformer/layer_{i}/moe/router, w_gate, w_up, w_down   [d, e], [e, d, f], [e, d, f], [e, f, d]
    transformer/layer_{i}/moe/router_bias, b_gate, b_up, b_down   [e], [e, f], [e, f], [e, d] (gpt-oss)
    transformer/layer_{i}/moe/shared_expert/{gate,up,down}_proj/w, .../moe/shared_expert_gate/w
    transformer/layer_{i}/mlp/{gate,up,down}_proj/w
    transformer/final_norm/scale,  transformer/lm_head  [d_model, vocab] (absent when tied)
    transformer/lm_head_bias  [vocab] (ERNIE-4.5 with use_bias)
"""
from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp

from moecli.model.attention import ATTENTION
from moecli.model.cache import Cache
from moecli.model.config import ModelConfig
from moecli.model.mlp import MLP
from moecli.model.moe import MoEBlock
from moecli.model.norms import norm
from moecli.model.ops import XLA, Ops
from moecli.model.quant import get_weight
from moecli.model.router import Routing


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32,
               keys_transposed: bool = False) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens: each layer's of its kind."""
    layers = tuple(ATTENTION[config.attention_of(i)].cache.empty(config, i, batch, max_len, dtype, keys_transposed)
                   for i in range(config.n_layers))
    return Cache(layers, jnp.zeros((), jnp.int32))


class DecoderLayer(hk.Module):
    """x = x + attn(norm(x));  x = x + ffn(norm(x)), with the parts the config names."""

    def __init__(self, config: ModelConfig, index: int, ops: Ops, mesh=None):
        super().__init__(name=f"layer_{index}")
        self.c, self.index, self.ops, self.mesh = config, index, ops, mesh

    def __call__(self, x, positions, cache, cache_pos, disabled=None, keep=None, n_valid=None):
        """With `keep` (an int32 position), returns only that position's output [batch, 1, d]:
        every token's keys and values still enter the cache (and every token is routed), but the
        feed-forward block runs for the kept token alone (see `Transformer`)."""
        c = self.c
        with jax.named_scope("attention"):
            h = norm(c.norm, c.d_model, c.norm_eps, name="input_norm")(x)
            kind = ATTENTION[c.attention_of(self.index)]
            padded = {} if getattr(kind.cache, "rewindable", True) else {"n_valid": n_valid}  # a recurrent state
            h, cache = kind.module(c, self.index, self.ops)(h, positions, cache, cache_pos, **padded)
            x = x + scaled(h, c.residual_scale)
        h = norm(c.norm, c.d_model, c.norm_eps, name="post_attn_norm")(x)
        routing = None
        if c.moe_layers[self.index]:
            with jax.named_scope("moe"):
                h, routing = MoEBlock(c, self.ops, self.mesh)(h, disabled, keep)  # routes every token
        else:
            if keep is not None:
                h = jax.lax.dynamic_slice_in_dim(h, keep, 1, axis=1)
            with jax.named_scope("mlp"):
                h = MLP(c.d_model, c.d_ff, self.ops, c.quant, name="mlp", bias=c.mlp_bias)(h)
        if keep is not None:
            x = jax.lax.dynamic_slice_in_dim(x, keep, 1, axis=1)           # [batch, 1, d_model]
        return x + scaled(h, c.residual_scale), cache, routing


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

    def __init__(self, config: ModelConfig, ops: Ops = XLA, mesh=None):
        super().__init__(name="transformer")
        self.c, self.ops, self.mesh = config, ops, mesh  # mesh: experts spread over devices (moecli.model.sharding)

    def __call__(self, ids: jax.Array, cache: Cache | None = None, expert_mask: jax.Array | None = None,
                 logits_at: jax.Array | None = None):
        c = self.c
        embed = hk.Embed(c.vocab_size, c.d_model, name="embed")
        x = scaled(embed(ids), c.embedding_scale)                         # [batch, seq, d_model]
        start = jnp.zeros((), jnp.int32) if cache is None else cache.pos
        # [seq], or [batch, seq] when each row has its own position (`Cache.pos` [batch]: batched serving)
        positions = start[..., None] + jnp.arange(ids.shape[1], dtype=jnp.int32)
        new_layers, routings = [], []
        trim = logits_at is not None and c.capacity_factor == 0
        # With a cache, the tokens after logits_at are padding (the decoder's length buckets): recurrent
        # layers (`rewindable` False) keep them out of their state.
        n_valid = None if cache is None or logits_at is None else logits_at + 1
        for i in range(c.n_layers):
            layer_cache = None if cache is None else cache.layers[i]
            disabled = None if expert_mask is None else expert_mask[len(routings)]
            keep = logits_at if trim and i == c.n_layers - 1 else None
            x, layer_cache, routing = DecoderLayer(c, i, self.ops, self.mesh)(
                x, positions, layer_cache, start, disabled, keep, n_valid)
            new_layers.append(layer_cache)
            if routing is not None:
                routings.append(routing)
        if logits_at is not None and not trim:
            x = jax.lax.dynamic_slice_in_dim(x, logits_at, 1, axis=1)    # [batch, 1, d_model]
        x = norm(c.norm, c.d_model, c.norm_eps, name="final_norm")(x)
        if c.tie_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, embed.embeddings, preferred_element_type=jnp.float32)
        else:
            head = get_weight("lm_head", [c.d_model, c.vocab_size], x.dtype,
                              hk.initializers.TruncatedNormal(c.d_model ** -0.5), c.quant)
            logits = self.ops.matmul(x, head, jnp.float32)
        if c.lm_head_bias:  # ERNIE-4.5's use_bias (its LM head has one even with tied embeddings)
            logits = logits + hk.get_parameter("lm_head_bias", [c.vocab_size], jnp.float32, init=jnp.zeros)
        logits = scaled(logits, c.logits_scale)                          # float32 [batch, seq, vocab]
        new_cache = None if cache is None else Cache(tuple(new_layers), start + ids.shape[1])
        return logits, new_cache, stack_routing(routings)


def scaled(x: jax.Array, scale: float) -> jax.Array:
    """x * scale in x's dtype (Granite's embedding, residual and logits multipliers); x itself for 1."""
    return x if scale == 1.0 else x * scale


def stack_routing(routings: list[Routing]) -> Routing | None:
    """Per-layer Routing -> one Routing with a leading [n_moe_layers] axis."""
    if not routings:
        return None
    return Routing(*(jnp.stack(parts) for parts in zip(*routings)))


def transformed(config: ModelConfig, mesh=None, ops: Ops = XLA) -> hk.Transformed:
    """The pure functions init(rng, ids, cache) and apply(params, ids, cache, expert_mask, logits_at),
    computed by `ops` (default: plain XLA, the differentiable reference; `moecli.kernels.registry`
    picks a backend's)."""
    return hk.without_apply_rng(hk.transform(
        lambda ids, cache=None, expert_mask=None, logits_at=None:
        Transformer(config, ops, mesh)(ids, cache, expert_mask, logits_at)))
