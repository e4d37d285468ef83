"""Gated DeltaNet linear attention (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving
Mamba2 with Delta Rule"): the `linear_attention` layers of Qwen3-Next and Qwen3.5.

Instead of a KV cache, each value head keeps a state S [k_head_dim, v_head_dim] that every token
decays by exp(g_t) and then corrects with the delta rule (Widrow-Hoff: write only what S does not
already predict):  S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  out_t = S^T q_t,
with q, k L2-normalised (q also scaled by k_head_dim^-0.5), beta = sigmoid(b) the write strength and
g = -exp(A_log) * softplus(a + dt_bias) the log decay. The cost is linear in the length and the
state's size fixed, so a decode step costs the same at any context.

Two forms compute it: `recurrent_gated_delta_rule`, one state update a token (decoding), and
`chunk_gated_delta_rule` for prompts: blocks of `chunk` tokens, within which the delta rule's
updates are folded into a few matrix products by the WY/UT representation (a unit lower-triangular
solve, Yang et al. 2024 "Parallelizing Linear Transformers with the Delta Rule over Sequence
Length"), and a `lax.scan` carries S from block to block — transformers' torch reference does the same.

Before the rule, q, k and v pass a short causal depthwise convolution with SiLU (the cache keeps its
last kernel-1 inputs); after it, each head's output is RMS-normed and gated by silu(z) (z: a fourth
projection of the input), then out_proj. The cache (`DeltaNetCache`) is the conv window and S: it
folds every token in, so it cannot be rewound to an earlier position (`rewindable = False`) and
padding must be kept out of it (`n_valid`).
"""
from __future__ import annotations

from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from moecli.model.config import ModelConfig
from moecli.model.linear import Linear
from moecli.model.ops import Ops


class DeltaNetCache(NamedTuple):
    """One linear-attention layer's recurrent state, of fixed size whatever the context."""

    conv: jax.Array   # [batch, conv_kernel - 1, conv_dim]: the convolution's last inputs
    state: jax.Array  # float32 [batch, v_heads, k_head_dim, v_head_dim]
    rewindable = False  # a state that folds every token in cannot go back to an earlier position

    @classmethod
    def empty(cls, config: ModelConfig, layer: int, batch: int, max_len: int, dtype, keys_transposed: bool):
        d = config.deltanet
        conv_dim = 2 * d.n_k_heads * d.k_head_dim + d.n_v_heads * d.v_head_dim
        return cls(jnp.zeros((batch, d.conv_kernel - 1, conv_dim), dtype),
                   jnp.zeros((batch, d.n_v_heads, d.k_head_dim, d.v_head_dim), jnp.float32))


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def prepare_qk(q: jax.Array, k: jax.Array, n_v_heads: int) -> tuple[jax.Array, jax.Array]:
    """q, k [b, t, k_heads, dk] -> float32 [b, t, v_heads, dk]: each key head serves n_v_heads // k_heads
    consecutive value heads; L2-normalised, q scaled by dk^-0.5."""
    group = n_v_heads // k.shape[2]
    q, k = (l2norm(jnp.repeat(x.astype(jnp.float32), group, axis=2)) for x in (q, k))
    return q * q.shape[-1] ** -0.5, k


def recurrent_gated_delta_rule(q, k, v, g, beta, state):
    """One state update a token. q, k [b, t, h, dk] (`prepare_qk`), v [b, t, h, dv], g, beta [b, t, h],
    state float32 [b, h, dk, dv] -> (float32 out [b, t, h, dv], the new state)."""
    def step(s, xs):
        q_t, k_t, v_t, g_t, b_t = xs                                       # [b, h, dk|dv], [b, h]
        s = s * jnp.exp(g_t)[..., None, None]
        delta = (v_t - jnp.einsum("bhkv,bhk->bhv", s, k_t)) * b_t[..., None]
        s = s + k_t[..., :, None] * delta[..., None, :]
        return s, jnp.einsum("bhkv,bhk->bhv", s, q_t)

    xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, g, beta))
    state, out = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(out, 0, 1), state


def chunk_gated_delta_rule(q, k, v, g, beta, state, chunk: int = 64):
    """The same result in blocks of `chunk` tokens (the WY/UT form; lengths need not be multiples:
    the tail is padded with g = beta = 0, which leaves the state alone)."""
    b, t, h, dk = k.shape
    dv, pad = v.shape[-1], (-t) % chunk
    n = (t + pad) // chunk

    def blocks(x):                                                       # [b, t, h, ...] -> [b, h, n, c, ...]
        x = jnp.moveaxis(x.astype(jnp.float32), 1, 2)
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        return x.reshape(b, h, n, chunk, *x.shape[3:])

    q, k, v, g, beta = (blocks(x) for x in (q, k, v, g, beta))
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    cum = jnp.cumsum(g, axis=-1)                                         # [b, h, n, c] log decay from the block start
    lower = jnp.tril(jnp.ones((chunk, chunk), bool))                     # j <= i
    decay = jnp.where(lower, jnp.exp(jnp.where(lower, cum[..., :, None] - cum[..., None, :], 0.0)), 0.0)
    ut = jnp.einsum("bhnik,bhnjk->bhnij", k_beta, k) * decay             # [b, h, n, c, c]
    intra = jnp.einsum("bhnik,bhnjk->bhnij", q, k) * decay
    system = jnp.where(jnp.tril(lower, -1), ut, 0.0) + jnp.eye(chunk)    # I + strictly lower part
    rhs = jnp.concatenate([v_beta, k_beta * jnp.exp(cum)[..., None]], axis=-1)
    solved = jax.lax.linalg.triangular_solve(system, rhs, left_side=True, lower=True, unit_diagonal=True)
    new_values, k_cumdecay = solved[..., :dv], solved[..., dv:]          # [b, h, n, c, dv], [b, h, n, c, dk]
    q_decayed = q * jnp.exp(cum)[..., None]
    k_decayed = k * jnp.exp(cum[..., -1:] - cum)[..., None]
    block_decay = jnp.exp(cum[..., -1])                                  # [b, h, n]

    def step(s, xs):                                                     # s [b, h, dk, dv]
        values, kc, qd, kd, attn, bd = xs
        v_new = values - kc @ s                                          # the part s does not predict
        out = qd @ s + attn @ v_new
        return s * bd[..., None, None] + jnp.swapaxes(kd, -1, -2) @ v_new, out

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (new_values, k_cumdecay, q_decayed, k_decayed, intra, block_decay))
    state, out = jax.lax.scan(step, state, xs)                           # out [n, b, h, c, dv]
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, n * chunk, dv)[:, :, :t]
    return jnp.moveaxis(out, 1, 2), state                                # [b, t, h, dv]


class GatedRMSNorm(hk.Module):
    """RMSNorm of each head's output, then times silu(z) (float32), as the FLA library's gated norm."""

    def __init__(self, dim: int, eps: float, name: str = "norm"):
        super().__init__(name=name)
        self.dim, self.eps = dim, eps

    def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
        scale = hk.get_parameter("scale", [self.dim], init=jnp.ones)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return x32 * scale.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))


def project(c: ModelConfig, ops: Ops, x: jax.Array):
    """The input projections (inside the calling module): x -> (q|k|v [b, t, conv_dim] before the convolution,
    z [b, t, hv, dv], b and a [b, t, hv])."""
    d = c.deltanet
    batch, seq, _ = x.shape
    key_dim, value_dim, group = d.n_k_heads * d.k_head_dim, d.n_v_heads * d.v_head_dim, d.n_v_heads // d.n_k_heads
    lin = lambda size, name: Linear(size, ops, with_bias=False, quant=c.quant, name=name)(x)  # noqa: E731
    if d.layout == "split":                                          # Qwen3.5: four projections
        mixed, z = lin(2 * key_dim + value_dim, "in_proj_qkv"), lin(value_dim, "in_proj_z")
        b, a = lin(d.n_v_heads, "in_proj_b"), lin(d.n_v_heads, "in_proj_a")
    else:  # Qwen3-Next: per key head [q (dk), k (dk), v (group x dv), z (group x dv)], then [b (group), a (group)]
        qkvz = lin(2 * key_dim + 2 * value_dim, "in_proj_qkvz").reshape(batch, seq, d.n_k_heads, -1)
        q, k, v, z = jnp.split(qkvz, [d.k_head_dim, 2 * d.k_head_dim, 2 * d.k_head_dim + group * d.v_head_dim], -1)
        b, a = jnp.split(lin(2 * d.n_v_heads, "in_proj_ba").reshape(batch, seq, d.n_k_heads, 2 * group), 2, -1)
        mixed = jnp.concatenate([t.reshape(batch, seq, -1) for t in (q, k, v)], axis=-1)
        b, a = b.reshape(batch, seq, d.n_v_heads), a.reshape(batch, seq, d.n_v_heads)
    return mixed, z.reshape(batch, seq, d.n_v_heads, d.v_head_dim), b, a


class GatedDeltaNet(hk.Module):
    """The linear-attention layer: (x, positions, cache, cache_pos, n_valid) -> (out, cache). `n_valid`
    (int32 scalar; None = all) says how many of the chunk's tokens are real: the padding after them
    stays out of the state. Positions are unused: the convolution and the decay order the tokens."""

    def __init__(self, config: ModelConfig, layer: int, ops: Ops, name: str = "attn"):
        super().__init__(name=name)
        self.c, self.ops = config, ops

    def __call__(self, x, positions, cache: DeltaNetCache | None, cache_pos, n_valid=None):
        c, d = self.c, self.c.deltanet
        batch, seq, _ = x.shape
        key_dim = d.n_k_heads * d.k_head_dim
        mixed, z, b, a = project(c, self.ops, x)
        conv_dim, width = mixed.shape[-1], d.conv_kernel
        # Causal depthwise convolution over [the cached last inputs, this chunk]: out_t = sum_j w_j x_{t-K+1+j}
        w = hk.get_parameter("conv_w", [conv_dim, 1, width], init=hk.initializers.TruncatedNormal(width ** -0.5))
        past = jnp.zeros((batch, width - 1, conv_dim), mixed.dtype) if cache is None else cache.conv.astype(mixed.dtype)
        window = jnp.concatenate([past, mixed], axis=1)                  # [b, K-1+t, conv_dim]
        conv = sum(window[:, j:j + seq].astype(jnp.float32) * w[:, 0, j].astype(jnp.float32) for j in range(width))
        mixed = jax.nn.silu(conv).astype(x.dtype)
        valid = jnp.full((), seq, jnp.int32) if n_valid is None else n_valid
        q, k, v = jnp.split(mixed, [key_dim, 2 * key_dim], axis=-1)
        q, k = prepare_qk(q.reshape(batch, seq, d.n_k_heads, -1), k.reshape(batch, seq, d.n_k_heads, -1), d.n_v_heads)
        v = v.reshape(batch, seq, d.n_v_heads, d.v_head_dim)
        a_log = hk.get_parameter("A_log", [d.n_v_heads], init=jnp.zeros).astype(jnp.float32)
        dt_bias = hk.get_parameter("dt_bias", [d.n_v_heads], init=jnp.ones).astype(jnp.float32)
        real = (jnp.arange(seq) < valid)[None, :, None]                  # padding: no decay, no write
        beta = jnp.where(real, jax.nn.sigmoid(b.astype(jnp.float32)), 0.0)             # [b, t, hv]
        g = jnp.where(real, -jnp.exp(a_log) * jax.nn.softplus(a.astype(jnp.float32) + dt_bias), 0.0)
        state = (jnp.zeros((batch, d.n_v_heads, d.k_head_dim, d.v_head_dim), jnp.float32)
                 if cache is None else cache.state)
        if seq == 1:
            out, state = recurrent_gated_delta_rule(q, k, v, g, beta, state)
        else:
            out, state = chunk_gated_delta_rule(q, k, v, g, beta, state, d.chunk)
        out = GatedRMSNorm(d.v_head_dim, c.norm_eps)(out, z).astype(x.dtype)    # [b, t, hv, dv]
        out = Linear(c.d_model, self.ops, with_bias=False, quant=c.quant, name="out_proj")(
            out.reshape(batch, seq, d.n_v_heads * d.v_head_dim))
        if cache is not None:
            conv_state = jax.lax.dynamic_slice_in_dim(window, valid, width - 1, axis=1)  # the last real inputs
            cache = DeltaNetCache(conv_state.astype(cache.conv.dtype), state)
        return out, cache
