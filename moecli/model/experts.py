"""The experts of a Mixture-of-Experts block: the pure-JAX implementations of the routed experts.

Mixture of Experts (Shazeer et al. 2017; GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021;
Mixtral, Jiang et al. 2024): a layer holds n_experts feed-forward networks, and a small linear
router picks top_k of them for each token. The model has the parameters of all experts but each
token pays for only k, which is why a 47B-parameter Mixtral runs like a 13B one.

Routing (token choice): router logits = x @ W_router; probabilities = softmax(logits) in float32;
each token keeps its top_k experts and their probabilities, optionally renormalised to sum to 1
(`norm_topk_prob`; Mixtral always does). The block's output is the weighted sum of the chosen
experts' outputs, plus Qwen2-MoE's always-on shared expert scaled by sigmoid(x @ W_shared_gate).

Two routing modes:
- dropless (capacity_factor = 0, the inference default): every assignment is computed; exact.
- capacity (capacity_factor > 0, as in GShard/Switch training): each expert has
  C = ceil(capacity_factor * tokens * top_k / n_experts) slots for the whole batch. Assignments
  claim slots first-come by token order (batch row, then position); an assignment that finds its
  expert full is dropped: it contributes nothing, as if a no-op expert took it, and the token
  keeps only the residual stream (plus its other experts). Its gate weight is not renormalised.
  Fixed-size expert buffers [n_experts, C, d_model] give static shapes, the reason training
  systems use it.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from moecli.model.config import ModelConfig
from moecli.model.quant import dense, take
from moecli.model.router import Routing


# ----------------------------------------------------------------------------- what one expert computes
# Every expert is a gated FFN: down(glu(x @ gate + b_gate, x @ up + b_up)) + b_down. The biases are
# optional (`biases` = (b_gate [e, f], b_up [e, f], b_down [e, d]) or None) and so is the gating:
# `glu` is one of GLUS; every implementation below takes both as keyword arguments.

def silu_glu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """SwiGLU's gating (Shazeer 2020, "GLU Variants Improve Transformer"): silu(gate) * up."""
    return jax.nn.silu(gate) * up


def clamped_swiglu(gate: jax.Array, up: jax.Array, limit: float, alpha: float) -> jax.Array:
    """gpt-oss's SwiGLU (OpenAI 2025): the gate clamped above at `limit` and up to [-limit, limit]
    (bounding the activations), then gate * sigmoid(alpha * gate) * (up + 1). With alpha = 1.702,
    x * sigmoid(1.702 x) is the sigmoid approximation of GELU (Hendrycks & Gimpel 2016)."""
    gate, up = jnp.minimum(gate, limit), jnp.clip(up, -limit, limit)
    return gate * jax.nn.sigmoid(alpha * gate) * (up + 1)


#: config.expert_act -> the experts' gating, given the config's parameters.
GLUS: dict[str, Callable[[ModelConfig], Callable]] = {
    "swiglu": lambda c: silu_glu,
    "clamped_swiglu": lambda c: functools.partial(clamped_swiglu, limit=c.swiglu_limit, alpha=c.swiglu_alpha),
}


def _plus(y: jax.Array, b: jax.Array | None) -> jax.Array:
    return y if b is None else y + b.astype(y.dtype)


def _spec_bias(b: jax.Array | None, spec: str) -> jax.Array | None:
    """A per-expert bias b [e, n] shaped to broadcast against einsum `spec`'s output, whose axes
    name the experts "e" and end with the n outputs (e.g. "tef" -> [1, e, f], "ecf" -> [e, 1, f])."""
    if b is None:
        return None
    out = spec.split("->")[1]
    return b.reshape([b.shape[0] if a == "e" else b.shape[1] if i == len(out) - 1 else 1 for i, a in enumerate(out)])


def swiglu(x, w_gate, w_up, w_down, up_spec: str, down_spec: str, glu: Callable = silu_glu, biases=None):
    """The experts' gated FFN, down(glu(x @ gate, x @ up)) (+ biases), batched over experts by einsum
    specs. Quantized weights (`moecli.model.quant`) are dequantized first: this is the reference path."""
    w_gate, w_up, w_down = (dense(w, x.dtype) for w in (w_gate, w_up, w_down))
    b_gate, b_up, b_down = biases or (None, None, None)
    hidden = glu(_plus(jnp.einsum(up_spec, x, w_gate), _spec_bias(b_gate, up_spec)),
                 _plus(jnp.einsum(up_spec, x, w_up), _spec_bias(b_up, up_spec)))
    return _plus(jnp.einsum(down_spec, hidden, w_down), _spec_bias(b_down, down_spec))


def experts_dense(x, w_gate, w_up, w_down, routing: Routing, n_experts: int, glu: Callable = silu_glu, biases=None):
    """Dropless, the simplest way: every expert on every token, combined with a dense
    [tokens, n_experts] weight matrix that is zero except at the chosen experts. Exact but
    n_experts/top_k times the FLOPs; kept as the reference the faster paths are tested against."""
    y = swiglu(x, w_gate, w_up, w_down, "td,edf->tef", "tef,efd->ted", glu, biases)             # [t, e, d]
    combine = jnp.sum(jax.nn.one_hot(routing.experts, n_experts) * routing.weights[..., None], axis=-2)
    return jnp.einsum("te,ted->td", combine.astype(y.dtype), y)


def expert_ffn(x, w_gate, w_up, w_down, e, glu: Callable = silu_glu, biases=None):
    """Expert e's gated FFN on tokens x [n, d] as three plain 2-D dots, reading only its weights."""
    gate, up, down = (dense(take(w, e), x.dtype) for w in (w_gate, w_up, w_down))
    b_gate, b_up, b_down = (None, None, None) if biases is None else (b[e] for b in biases)
    return _plus(glu(_plus(x @ gate, b_gate), _plus(x @ up, b_up)) @ down, b_down)


def experts_scanned(x, w_gate, w_up, w_down, routing: Routing, n_experts: int, elsewhere: bool = False,
                    glu: Callable = silu_glu, biases=None):
    """Dropless for a few tokens (decoding): a loop over the tokens*top_k assignments, each reading
    only its own expert's weights through a dynamic index, so a decode step reads k experts, not
    all of them. Plain matrix-vector products inside a scan beat gathering the k experts' weights
    into a new array and a batched einsum (11 vs 1.4 GB/s measured on a 2-core CPU).
    With `elsewhere` (sharded experts, see `moecli.model.sharding`) an expert id equal to n_experts
    means "held by another device" and is skipped; unsharded, that branch costs ~5% and is left out."""
    tokens, top_k = routing.experts.shape
    expert, weight = routing.experts.reshape(-1), routing.weights.reshape(-1)
    token = jnp.repeat(jnp.arange(tokens), top_k)

    def add(out, i):
        y = expert_ffn(x[token[i]][None], w_gate, w_up, w_down, expert[i], glu, biases)[0]
        return out.at[token[i]].add(weight[i].astype(y.dtype) * y)

    def one_assignment(out, i):
        if elsewhere:
            return jax.lax.cond(expert[i] < n_experts, add, lambda out, _: out, out, i), None
        return add(out, i), None

    return jax.lax.scan(one_assignment, jnp.zeros_like(x), jnp.arange(tokens * top_k))[0]


class Blocks(NamedTuple):
    """A prompt's assignments sorted by expert, each expert's group padded to whole blocks."""

    xs: jax.Array      # [n_blocks * block, d] the assignments' inputs in that order (padding: zeros)
    expert: jax.Array  # int32 [n_blocks] each block's expert; n_experts for the spare blocks
    rows: jax.Array    # [n] each sorted assignment's row of xs (out of range: another device's)
    order: jax.Array   # [n] the sort: assignment order[i] is the i-th sorted one


def sort_into_blocks(x, routing: Routing, n_experts: int, min_block: int = 8) -> Blocks:
    """Sort the assignments by expert and pad each expert's group to a multiple of a block size
    (a power of two near the tokens per expert). There are at most ceil(assignments / block) +
    n_experts blocks, so shapes stay static. Expert id n_experts = "held by another device":
    sorted last and left out, like the spare blocks."""
    tokens, top_k = routing.experts.shape
    d, n = x.shape[-1], tokens * top_k
    block = min(128, max(min_block, 1 << (-(-n // n_experts) - 1).bit_length()))   # ~ tokens per expert
    expert = routing.experts.reshape(-1)                                    # [n]
    order = jnp.argsort(expert, stable=True)                                # grouped by expert
    counts = jnp.bincount(expert, length=n_experts + 1)[:n_experts]
    padded = -(-counts // block) * block
    group_row = jnp.cumsum(padded) - padded                                 # first padded row
    group_idx = jnp.cumsum(counts) - counts                                 # first sorted index
    sorted_expert = jnp.minimum(expert[order], n_experts - 1)
    rows = group_row[sorted_expert] + jnp.arange(n) - group_idx[sorted_expert]   # [n]
    n_blocks = -(-n // block) + n_experts
    rows = jnp.where(expert[order] < n_experts, rows, n_blocks * block)        # elsewhere: out of range
    xs = jnp.zeros((n_blocks * block, d), x.dtype).at[rows].set(x[order // top_k], mode="drop")
    block_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(n_blocks) * block, side="right")
    return Blocks(xs, block_expert.astype(jnp.int32), rows, order)


def combine_blocks(ys: jax.Array, blocks: Blocks, routing: Routing) -> jax.Array:
    """Each token's gate-weighted sum of its assignments' rows of ys [n_blocks * block, d]."""
    tokens, top_k = routing.experts.shape
    n, d = tokens * top_k, ys.shape[-1]
    ys = ys.at[blocks.rows].get(mode="fill", fill_value=0)                      # [n, d] sorted order
    y = jnp.zeros((n, d), ys.dtype).at[blocks.order].set(ys)                    # assignment order
    return jnp.einsum("tk,tkd->td", routing.weights.astype(y.dtype), y.reshape(tokens, top_k, d))


def experts_blocked(x, w_gate, w_up, w_down, routing: Routing, n_experts: int, elsewhere: bool = False,
                    glu: Callable = silu_glu, biases=None):
    """Dropless for many tokens (prefill), block-sparse as in MegaBlocks (Gale et al. 2022): the
    assignments sorted into blocks by expert (`sort_into_blocks`), one dense [block, d] x [d, f]
    product per block with that block's expert, in a scan. FLOPs grow with top_k, not n_experts.
    On CPU this is ~4x faster than all-experts dense and ~40x faster than jax.lax.ragged_dot at a
    512-token prompt. Another device's assignments are left out (so `elsewhere` changes nothing)."""
    blocks = sort_into_blocks(x, routing, n_experts)
    n_blocks, d = blocks.expert.shape[0], x.shape[-1]

    def one_block(_, inputs):
        xb, e = inputs
        ffn = lambda: expert_ffn(xb, w_gate, w_up, w_down, e, glu, biases)  # noqa: E731
        return 0, jax.lax.cond(e < n_experts, ffn, lambda: xb * 0)

    _, ys = jax.lax.scan(one_block, 0, (blocks.xs.reshape(n_blocks, -1, d), blocks.expert))
    return combine_blocks(ys.reshape(-1, d), blocks, routing)


def claim_rank(expert: jax.Array, n_experts: int) -> jax.Array:
    """For assignments [n] in token order, how many earlier assignments chose the same expert:
    the first-come rank that capacity routing compares with the capacity."""
    claims = jax.nn.one_hot(expert, n_experts, dtype=jnp.int32)  # [n, e]
    return jnp.sum((jnp.cumsum(claims, axis=0) - 1) * claims, axis=-1)


def experts_capacity(x, w_gate, w_up, w_down, routing: Routing, capacity: int, n_experts: int,
                     glu: Callable = silu_glu, biases=None):
    """Capacity routing: scatter assignments into [n_experts, capacity] slots, first-come by token
    order; an assignment over capacity is dropped (passes through as the residual)."""
    tokens, top_k = routing.experts.shape
    expert = routing.experts.reshape(-1)                         # [t*k], token-major order
    slot = claim_rank(expert, n_experts)                         # rank within its expert
    slot = jnp.where(slot < capacity, slot, capacity)            # `capacity` = out of range: dropped
    token = jnp.repeat(jnp.arange(tokens), top_k)
    buffer = jnp.zeros((n_experts, capacity, x.shape[-1]), x.dtype)
    buffer = buffer.at[expert, slot].set(x[token], mode="drop")                # [e, c, d]
    out = swiglu(buffer, w_gate, w_up, w_down, "ecd,edf->ecf", "ecf,efd->ecd", glu, biases)     # [e, c, d]
    y = out.at[expert, slot].get(mode="fill", fill_value=0).reshape(tokens, top_k, -1)
    return jnp.einsum("tk,tkd->td", routing.weights.astype(y.dtype), y)


