"""The Mixture-of-Experts block: a token-choice top-k router over SwiGLU experts.

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

from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from moecli.model.config import ModelConfig
from moecli.model.layers import MLP, Linear


class Routing(NamedTuple):
    """What the router decided for each token of one MoE layer."""

    experts: jax.Array  # int32 [batch, seq, top_k], best first
    weights: jax.Array  # float32 [batch, seq, top_k], the gate weights applied
    logits: jax.Array   # float32 [batch, seq, n_experts], for auxiliary losses and views


def route(x: jax.Array, router_w: jax.Array, top_k: int, renormalise: bool,
          disabled: jax.Array | None = None) -> Routing:
    """Token-choice top-k routing in float32 (bf16 logits make near-ties flip experts).

    Ablation: experts marked in `disabled` [n_experts] get a router logit of -inf, so the softmax
    spreads their probability over the remaining experts and each token's top_k are chosen among
    those (i.e. its assignments are renormalised over the remaining experts, never dropped)."""
    logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), router_w.astype(jnp.float32))
    if disabled is not None:
        logits = jnp.where(disabled, -jnp.inf, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if renormalise:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return Routing(experts.astype(jnp.int32), weights, logits)


def swiglu(x, w_gate, w_up, w_down, up_spec: str, down_spec: str):
    """The experts' SwiGLU, down(silu(x @ gate) * (x @ up)), batched over experts by einsum specs."""
    hidden = jax.nn.silu(jnp.einsum(up_spec, x, w_gate)) * jnp.einsum(up_spec, x, w_up)
    return jnp.einsum(down_spec, hidden, w_down)


def experts_dense(x, w_gate, w_up, w_down, routing: Routing, n_experts: int):
    """Dropless, the simplest way: every expert on every token, combined with a dense
    [tokens, n_experts] weight matrix that is zero except at the chosen experts. Exact but
    n_experts/top_k times the FLOPs; kept as the reference the faster paths are tested against."""
    y = swiglu(x, w_gate, w_up, w_down, "td,edf->tef", "tef,efd->ted")                          # [t, e, d]
    combine = jnp.sum(jax.nn.one_hot(routing.experts, n_experts) * routing.weights[..., None], axis=-2)
    return jnp.einsum("te,ted->td", combine.astype(y.dtype), y)


def expert_ffn(x, w_gate, w_up, w_down, e):
    """Expert e's SwiGLU on tokens x [n, d] as three plain 2-D dots, reading only its weights."""
    return (jax.nn.silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]


def experts_scanned(x, w_gate, w_up, w_down, routing: Routing, n_experts: int, elsewhere: bool = False):
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
        y = expert_ffn(x[token[i]][None], w_gate, w_up, w_down, expert[i])[0]
        return out.at[token[i]].add(weight[i].astype(y.dtype) * y)

    def one_assignment(out, i):
        if elsewhere:
            return jax.lax.cond(expert[i] < n_experts, add, lambda out, _: out, out, i), None
        return add(out, i), None

    return jax.lax.scan(one_assignment, jnp.zeros_like(x), jnp.arange(tokens * top_k))[0]


def experts_cpu_kernel(x, w_gate, w_up, w_down, routing: Routing, n_experts: int, elsewhere: bool = False):
    """Dropless on CPU, as hand-written kernels (`moecli.kernels.cpu.ffi`). Decoding: each chosen
    expert read once, in place, on every core, bfloat16 widened in registers (~3x
    `experts_scanned` in float32, ~30x in bfloat16). A prompt: one grouped matrix product in which
    each expert multiplies exactly its own tokens (~2x `experts_blocked`, which pads every expert
    to whole blocks and runs a scan of small dots). Ids outside [0, n_experts) ("elsewhere") are skipped."""
    from moecli.kernels.cpu import ffi as cpu_kernels

    def reference(x, experts, weights, w_gate, w_up, w_down):
        return experts_blocked(x, w_gate, w_up, w_down, Routing(experts, weights, None), n_experts)

    kernel = cpu_kernels.with_reference_gradient(cpu_kernels.experts, reference)
    return kernel(x, routing.experts, routing.weights, w_gate, w_up, w_down)


def experts_gpu_kernel(x, w_gate, w_up, w_down, routing: Routing, n_experts: int, elsewhere: bool = False):
    """Dropless decoding on GPU as a Pallas kernel (`moecli.kernels.gpu.pallas`): each assignment's expert
    matrices streamed once, in place, split over hundreds of programs."""
    from moecli.kernels.gpu import pallas as gpu_kernels

    return _on_gpu(gpu_kernels.experts, experts_scanned, x, w_gate, w_up, w_down, routing, n_experts, elsewhere)


def _on_gpu(kernel, fallback, x, w_gate, w_up, w_down, routing: Routing, n_experts: int, elsewhere: bool):
    """kernel(x, ids, gate weights, w_gate, w_up, w_down) with `fallback`, the pure-JAX path computing
    the same thing, for its gradients and for the expert stacks the GPU kernels cannot take (see
    `gpu_kernels.applies`)."""
    from moecli.kernels.cpu import ffi as cpu_kernels
    from moecli.kernels.gpu import pallas as gpu_kernels

    if not gpu_kernels.applies(*w_gate.shape):
        return fallback(x, w_gate, w_up, w_down, routing, n_experts, elsewhere)

    def reference(x, experts, weights, w_gate, w_up, w_down):
        return fallback(x, w_gate, w_up, w_down, Routing(experts, weights, None), n_experts, True)

    return cpu_kernels.with_reference_gradient(kernel, reference)(x, routing.experts, routing.weights,
                                                                  w_gate, w_up, w_down)


def pick_experts(tokens: int, top_k: int, n_experts: int):
    """The dropless implementation for `tokens` tokens: the hand-written kernels on CPU (when they
    could be built); elsewhere, when there are fewer assignments than experts (decoding), the
    Pallas kernel on GPU or a scan over the assignments, and for more (prompts) block-sparse, as
    a Pallas grouped GEMM on GPU or a scan of dense blocks."""
    from moecli.kernels.cpu import ffi as cpu_kernels
    from moecli.kernels.gpu import pallas as gpu_kernels

    if cpu_kernels.on():
        return experts_cpu_kernel
    if tokens * top_k < n_experts:
        return experts_gpu_kernel if gpu_kernels.on() else experts_scanned
    return experts_gpu_grouped if gpu_kernels.on() else experts_blocked


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


def experts_blocked(x, w_gate, w_up, w_down, routing: Routing, n_experts: int, elsewhere: bool = False):
    """Dropless for many tokens (prefill), block-sparse as in MegaBlocks (Gale et al. 2022): the
    assignments sorted into blocks by expert (`sort_into_blocks`), one dense [block, d] x [d, f]
    product per block with that block's expert, in a scan. FLOPs grow with top_k, not n_experts.
    On CPU this is ~4x faster than all-experts dense and ~40x faster than jax.lax.ragged_dot at a
    512-token prompt. Another device's assignments are left out (so `elsewhere` changes nothing)."""
    blocks = sort_into_blocks(x, routing, n_experts)
    n_blocks, d = blocks.expert.shape[0], x.shape[-1]

    def one_block(_, inputs):
        xb, e = inputs
        return 0, jax.lax.cond(e < n_experts, lambda: expert_ffn(xb, w_gate, w_up, w_down, e), lambda: xb * 0)

    _, ys = jax.lax.scan(one_block, 0, (blocks.xs.reshape(n_blocks, -1, d), blocks.expert))
    return combine_blocks(ys.reshape(-1, d), blocks, routing)


def experts_gpu_grouped(x, w_gate, w_up, w_down, routing: Routing, n_experts: int, elsewhere: bool = False):
    """Dropless prompts on GPU: the same blocks as `experts_blocked`, but each projection is one
    Pallas kernel over all blocks at once (`gpu_kernels.grouped_matmul`, a grouped GEMM on the
    tensor cores), not a scan of small products."""
    from moecli.kernels.gpu import pallas as gpu_kernels

    def kernel(x, experts, weights, w_gate, w_up, w_down):
        routing = Routing(experts, weights, None)
        blocks = sort_into_blocks(x, routing, n_experts, min_block=16)
        gate, up = (gpu_kernels.grouped_matmul(blocks.xs, blocks.expert, w) for w in (w_gate, w_up))
        hidden = (jax.nn.silu(gate) * up).astype(w_down.dtype)
        ys = gpu_kernels.grouped_matmul(hidden, blocks.expert, w_down)
        return combine_blocks(ys, blocks, routing).astype(x.dtype)

    return _on_gpu(kernel, experts_blocked, x, w_gate, w_up, w_down, routing, n_experts, elsewhere)


def claim_rank(expert: jax.Array, n_experts: int) -> jax.Array:
    """For assignments [n] in token order, how many earlier assignments chose the same expert:
    the first-come rank that capacity routing compares with the capacity."""
    claims = jax.nn.one_hot(expert, n_experts, dtype=jnp.int32)  # [n, e]
    return jnp.sum((jnp.cumsum(claims, axis=0) - 1) * claims, axis=-1)


def experts_capacity(x, w_gate, w_up, w_down, routing: Routing, capacity: int, n_experts: int):
    """Capacity routing: scatter assignments into [n_experts, capacity] slots, first-come by token
    order; an assignment over capacity is dropped (passes through as the residual)."""
    tokens, top_k = routing.experts.shape
    expert = routing.experts.reshape(-1)                         # [t*k], token-major order
    slot = claim_rank(expert, n_experts)                         # rank within its expert
    slot = jnp.where(slot < capacity, slot, capacity)            # `capacity` = out of range: dropped
    token = jnp.repeat(jnp.arange(tokens), top_k)
    buffer = jnp.zeros((n_experts, capacity, x.shape[-1]), x.dtype)
    buffer = buffer.at[expert, slot].set(x[token], mode="drop")                # [e, c, d]
    out = swiglu(buffer, w_gate, w_up, w_down, "ecd,edf->ecf", "ecf,efd->ecd")                  # [e, c, d]
    y = out.at[expert, slot].get(mode="fill", fill_value=0).reshape(tokens, top_k, -1)
    return jnp.einsum("tk,tkd->td", routing.weights.astype(y.dtype), y)


class MoEBlock(hk.Module):
    """Router + stacked experts (+ optional shared expert). Returns (output, Routing)."""

    def __init__(self, config: ModelConfig, mesh=None, name: str = "moe"):
        super().__init__(name=name)
        self.c, self.mesh = config, mesh  # mesh: experts split over devices (moecli.model.sharding)

    def __call__(self, x: jax.Array, disabled: jax.Array | None = None,
                 keep: jax.Array | None = None) -> tuple[jax.Array, Routing]:
        """x [batch, seq, d] -> (y, Routing of every token). With `keep` (an int32 position; dropless
        routing only), y [batch, 1, d] is that one position's output: every token is routed (the
        routing views see them all), only the kept one runs its experts."""
        c = self.c
        batch, seq, d = x.shape
        router_w = hk.get_parameter("router", [d, c.n_experts], init=hk.initializers.TruncatedNormal(0.02))
        init = hk.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal")
        w_gate = hk.get_parameter("w_gate", [c.n_experts, d, c.d_expert], init=init)  # [e, d, f]
        w_up = hk.get_parameter("w_up", [c.n_experts, d, c.d_expert], init=init)      # [e, d, f]
        w_down = hk.get_parameter("w_down", [c.n_experts, c.d_expert, d], init=init)  # [e, f, d]

        routing = route(x, router_w, c.top_k, c.norm_topk_prob, disabled)
        used = routing
        if keep is not None:
            assert c.capacity_factor == 0, "capacity couples the tokens: every one must run"
            x = jax.lax.dynamic_slice_in_dim(x, keep, 1, axis=1)
            used = Routing(*(jax.lax.dynamic_slice_in_dim(t, keep, 1, axis=1) for t in routing))
            batch, seq, d = x.shape
        flat = Routing(*(t.reshape(batch * seq, -1) for t in used))
        xs = x.reshape(batch * seq, d)
        if c.capacity_factor > 0:
            y = experts_capacity(xs, w_gate, w_up, w_down, flat, c.capacity(batch * seq), c.n_experts)
        else:
            experts = pick_experts(batch * seq, c.top_k, c.n_experts)
            if self.mesh is None:
                y = experts(xs, w_gate, w_up, w_down, flat, c.n_experts)
            else:
                from moecli.model.sharding import shard_experts
                y = shard_experts(experts, self.mesh)(xs, flat.experts, flat.weights, w_gate, w_up, w_down)
        y = y.reshape(batch, seq, d)

        if c.d_shared_expert:
            shared = MLP(d, c.d_shared_expert, name="shared_expert")(x)
            gate = Linear(1, with_bias=False, name="shared_expert_gate")(x)
            y = y + jax.nn.sigmoid(gate.astype(jnp.float32)).astype(x.dtype) * shared
        return y, routing
