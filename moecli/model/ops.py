"""The operations the model hands to a backend, and the plain-XLA reference set.

The model's modules never decide *how* a matrix product, attention or the experts are computed:
they call the `Ops` they were built with. Which set that is — the C++ CPU kernels, the Pallas GPU
kernels, plain XLA — is chosen once, when a `Model` is built (`moecli.kernels.registry.select`),
and recorded on it. `XLA` below is the reference: plain JAX, differentiable, the same on every
platform, and what the faster sets are tested against. Training uses it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp

from moecli.model import experts as E
from moecli.model.quant import dense


def matmul_xla(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
    """x [..., k] @ w [k, n], returned in `out_dtype` (default: x's); a quantized w is dequantized."""
    return jnp.matmul(x, dense(w, x.dtype), preferred_element_type=out_dtype or x.dtype)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None, chunk: int | None = None) -> jax.Array:
    """Causal mask [q, k]: a query sees keys at or before its own position (and, with a sliding
    window, fewer than `window` positions back; with chunked attention, Llama-4's, only keys in its
    own block of `chunk` positions, [chunk * (q // chunk), q]: local attention whose span resets at
    every block boundary, so a chunked layer's cost is bounded without a sliding window's overlap).
    Queries at per-row positions [batch, q] give a mask [batch, 1, 1, q, k], shaped for the scores
    [b, kv, group, q, k]."""
    q_pos, k_pos = q_pos[..., :, None], k_pos[None, :]
    visible = k_pos <= q_pos
    if window is not None:
        visible &= k_pos > q_pos - window
    if chunk is not None:
        visible &= k_pos // chunk == q_pos // chunk
    return visible if visible.ndim == 2 else visible[:, None, None]


def softmax_with_sinks(scores: jax.Array, sinks: jax.Array | None) -> jax.Array:
    """softmax over the last axis of float32 `scores` [b, kv, g, t, len]; with `sinks` [kv, g], each
    head's learned sink logit joins the denominator only ("attention sinks", Xiao et al. 2023, as
    gpt-oss learns them): a head can put weight on nothing instead of being forced onto some key."""
    if sinks is None:
        return jax.nn.softmax(scores, axis=-1)
    sink = sinks.astype(jnp.float32)[None, :, :, None, None]                    # [1, kv, g, 1, 1]
    top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
    exp = jnp.exp(scores - top)
    return exp / (jnp.sum(exp, axis=-1, keepdims=True) + jnp.exp(sink - top))


def attend_xla(q, k, v, positions, window: int | None, sinks=None, scale: float | None = None,
               chunk: int | None = None) -> jax.Array:
    """softmax(q k^T * scale, causal mask) v, in float32; scale defaults to 1 / sqrt(q's head_dim).

    q [b, kv, group, t, d] at `positions` [t] (or [b, t]); keys [b, kv, len, d] and values [b, kv, len, d_v]
    (d_v may differ from d: multi-head latent attention) at positions 0..len-1 (a cache's slots, or
    the chunk itself); `sinks` [kv, group] or None (`softmax_with_sinks`); `chunk`: chunked attention
    (`attention_mask`). Returns float32
    [b, kv, group, t, d_v]. The softmax runs in float32: bfloat16's 8 mantissa bits are too few for a
    sum over thousands of keys."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", q.astype(k.dtype), k, preferred_element_type=jnp.float32)
    scores = scores * (q.shape[-1] ** -0.5 if scale is None else scale)
    mask = attention_mask(positions, jnp.arange(k.shape[2]), window, chunk)      # [t, len] or [b, 1, 1, t, len]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = softmax_with_sinks(scores, sinks)
    return jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)


def experts_xla(tokens: int, top_k: int, n_experts: int, dtype) -> Callable:
    """The dropless experts for `tokens` tokens: a scan over the assignments when there are fewer
    than experts (decoding reads only the chosen experts), else block-sparse (prompts)."""
    return E.experts_scanned if tokens * top_k < n_experts else E.experts_blocked


def _same(fn, x):
    return fn(x)


@dataclass(frozen=True)
class Ops:
    """One backend's implementations of the model's operations (see the module docstring)."""

    name: str
    matmul: Callable = matmul_xla          # (x, w, out_dtype=None) -> x @ w
    attention: Callable = attend_xla       # (q, k, v, positions, window, sinks=None, scale=None, chunk=None) -> float32 [b, kv, g, t, d_v]
    experts: Callable = experts_xla        # (tokens, top_k, n_experts, weight dtype) -> dropless experts fn
    # ... for experts of any gating, with biases (gpt-oss): fns that also take glu= and biases=
    gated_experts: Callable = experts_xla
    keys_transposed: bool = False          # the KV cache keeps keys as [b, kv, d, len] (see model.cache)
    float32_cache: bool = False            # the KV cache in float32 whatever the weights' dtype
    isolate: Callable = _same              # isolate(fn, x) = fn(x), computed apart from its consumers
    notes: tuple[str, ...] = field(default=(), compare=False)   # what `--verbose` prints about it


XLA = Ops("xla")
