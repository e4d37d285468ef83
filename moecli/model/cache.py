"""Per-layer caches behind one interface, and the whole model's cache.

KV caching: during generation each new token attends to every earlier token, whose keys and
values do not change; storing them makes a decode step cost O(context) instead of re-running the
whole prefix. Each layer's cache is of its attention kind's own type (`moecli.model.attention.ATTENTION`
pairs them): keys and values (`KVCache`), or multi-head latent attention's compressed latents
(`moecli.model.mla.LatentCache`); recurrent states would fit the same interface — `empty(...)`
builds one, the layer's attention reads and writes it — so the decoder, chat cache reuse and
sharding never look inside. A cache type says whether it can be rewound (`rewindable`): keys and values
at positions past `Cache.pos` are simply ignored, so moving `pos` back forgets them; a recurrent state
(`moecli.model.deltanet.DeltaNetCache`) has folded them in and cannot, so the decoder snapshots it
(`moecli.inference.decoder.Decoder.rewind`).

Caches are preallocated to a fixed length, so shapes never change; the write position is an
array (`Cache.pos`), not a Python int, so every decode step has the same shapes and compiles once.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moecli.model.config import ModelConfig


class KVCache(NamedTuple):
    """One layer's keys and values for positions 0..max_len-1.

    Keys are [batch, kv_heads, max_len, head_dim] — or [batch, kv_heads, head_dim, max_len] where the
    backend asks for it (`Ops.keys_transposed`: the CPU backend, whose attention reads them as the
    right operand of a plain matrix product)."""

    k: jax.Array
    v: jax.Array  # [batch, kv_heads, max_len, head_dim]
    rewindable = True  # moving Cache.pos back forgets the later positions

    @classmethod
    def empty(cls, config: ModelConfig, layer: int, batch: int, max_len: int, dtype, keys_transposed: bool):
        values = (batch, config.n_kv_heads, max_len, config.head_dim)
        keys = (batch, config.n_kv_heads, config.head_dim, max_len) if keys_transposed else values
        return cls(jnp.zeros(keys, dtype), jnp.zeros(values, dtype))

    def write(self, k: jax.Array, v: jax.Array, pos: jax.Array, keys_transposed: bool) -> "KVCache":
        """This chunk's k and v [batch, kv_heads, t, head_dim] stored at positions pos..pos+t-1."""
        return KVCache(write_at(self.k, k, pos, keys_transposed), write_at(self.v, v, pos, False))


def write_at(buffer: jax.Array, x: jax.Array, pos: jax.Array, transposed: bool) -> jax.Array:
    """x [batch, heads, t, d] stored into a cache buffer at positions pos..pos+t-1, in the buffer's dtype:
    a buffer [batch, heads, max_len, d], or [batch, heads, d, max_len] when `transposed`. `pos` is a
    scalar, or int32 [batch] when each row writes at its own position (batched serving)."""
    if pos.ndim == 1:  # one update per row: a scatter
        return jax.vmap(lambda b, r, p: write_at(b[None], r[None], p, transposed)[0])(buffer, x, pos)
    if transposed:
        return jax.lax.dynamic_update_slice(buffer, x.swapaxes(2, 3).astype(buffer.dtype), (0, 0, 0, pos))
    return jax.lax.dynamic_update_slice(buffer, x.astype(buffer.dtype), (0, 0, pos, 0))


class Cache(NamedTuple):
    """Every layer's cache plus `pos`, how many positions are filled: an int32 scalar, or int32 [batch]
    when the rows hold sequences of different lengths (`moecli.serve.batch`: continuous batching)."""

    layers: tuple
    pos: jax.Array

    def rewindable(self) -> tuple[bool, ...]:
        """Per layer: whether its cache can go back to an earlier `pos` (a type without the flag can)."""
        return tuple(getattr(layer, "rewindable", True) for layer in self.layers)

