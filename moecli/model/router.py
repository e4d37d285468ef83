"""Routers: which experts each token goes to, and with what weight. All in float32: bfloat16
router logits make near-ties flip experts.

A router kind is a function (x [batch, seq, d], router weights [d, n_experts], config, disabled)
-> Routing; `moecli.model.parts.ROUTERS` names them for the families."""
from __future__ import annotations

from typing import NamedTuple

import haiku as hk
import jax
import jax.numpy as jnp

from moecli.model.config import ModelConfig


class Routing(NamedTuple):
    """What the router decided for each token of one MoE layer."""

    experts: jax.Array  # int32 [batch, seq, top_k], best first
    weights: jax.Array  # float32 [batch, seq, top_k], the gate weights applied
    logits: jax.Array   # float32 [batch, seq, n_experts], for auxiliary losses and views


def route(x: jax.Array, router_w: jax.Array, top_k: int, renormalise: bool,
          disabled: jax.Array | None = None, groups: tuple[int, int] = (1, 1), scale: float = 1.0,
          selection_bias: jax.Array | None = None, norm_min: float = 0.0) -> Routing:
    """Token-choice routing, softmax then top-k (Shazeer et al. 2017; Mixtral, Qwen-MoE, OLMoE):
    probabilities = softmax(x @ W_router); each token keeps its top_k experts and their
    probabilities, renormalised to sum to 1 when `renormalise` (`norm_topk_prob`).

    DeepSeek-V2 adds two things. Its `group_limited_greedy`: with `groups` = (n_group, topk_group), a
    token chooses only among the experts of its topk_group groups with the highest best probability
    (`group_mask` "max"; the others' probabilities count as 0, as transformers masks them). And its
    weights are times `scale` (routed_scaling_factor). (1, 1) and 1.0 leave plain top-k routing.

    ERNIE-4.5 adds a `selection_bias` [n_experts] to the probabilities to *choose* the top_k only (its
    `e_score_correction_bias`, as `sigmoid_topk`'s but on softmax probabilities), and renormalises by
    max(sum, `norm_min`) (`moe_norm_min`), so a token whose chosen experts all have tiny probabilities
    is not blown up. None and 0.0 leave plain routing.

    Ablation: experts marked in `disabled` [n_experts] get a router logit of -inf, so the softmax
    spreads their probability over the remaining experts and each token's top_k are chosen among
    those (i.e. its assignments are renormalised over the remaining experts, never dropped); they
    rank below every other expert, even one whose probability underflows to 0 or lies outside the
    token's groups (`outside_groups_last`)."""
    logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), router_w.astype(jnp.float32))
    if disabled is not None:
        logits = jnp.where(disabled, -jnp.inf, logits)
    probs = jax.nn.softmax(logits, axis=-1)                                        # [b, t, e]
    rank = probs if selection_bias is None else probs + selection_bias.astype(jnp.float32)
    rank = rank if disabled is None else jnp.where(disabled, -jnp.inf, rank)
    if groups[0] > 1:
        rank = outside_groups_last(rank, group_mask(probs, *groups, "max"))
    experts = jax.lax.top_k(rank, top_k)[1]                                        # [b, t, k]
    weights = jnp.take_along_axis(probs, experts, axis=-1)
    if renormalise:
        total = jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights / (jnp.maximum(total, norm_min) if norm_min else total)
    return Routing(experts.astype(jnp.int32), weights * scale if scale != 1.0 else weights, logits)




def softmax_topk(x: jax.Array, router_w: jax.Array, config: ModelConfig, disabled: jax.Array | None) -> Routing:
    """`route` with the config's top_k, norm_topk_prob (norm_min), expert groups, routed_scaling_factor and,
    with `selection_bias`, the parameter "score_bias" (`FLOAT32_PARAMS`)."""
    c = config
    bias = hk.get_parameter("score_bias", [c.n_experts], jnp.float32, init=jnp.zeros) if c.selection_bias else None
    return route(x, router_w, c.top_k, c.norm_topk_prob, disabled, (c.n_group, c.topk_group), c.routed_scaling_factor,
                 bias, c.norm_min)


def group_mask(scores: jax.Array, n_group: int, topk_group: int, group_score: str) -> jax.Array:
    """Group-limited routing (DeepSeek-V2/V3): the experts split into `n_group` equal groups (one per
    device group in training, to bound communication); each token keeps only its `topk_group` best
    groups, ranked by the sum of each group's two best scores ("top2_sum", V3) or its best one ("max",
    V2). Returns bool [..., n_experts], True for the experts of the kept groups."""
    *lead, n = scores.shape
    grouped = scores.reshape(*lead, n_group, n // n_group)                        # [..., groups, per group]
    if group_score == "top2_sum":
        rank = jnp.sum(jax.lax.top_k(grouped, min(2, n // n_group))[0], axis=-1)
    else:
        rank = jnp.max(grouped, axis=-1)                                           # [..., groups]
    kept = jax.lax.top_k(rank, topk_group)[1]                                      # [..., topk_group]
    chosen = jnp.sum(jax.nn.one_hot(kept, n_group, dtype=jnp.int32), axis=-2) > 0  # [..., groups]
    return jnp.repeat(chosen, n // n_group, axis=-1)


def outside_groups_last(rank: jax.Array, kept: jax.Array) -> jax.Array:
    """A top-k ranking [..., n_experts] limited to the kept groups (`group_mask`) without letting an
    expert mask break it: `rank` where `kept`, elsewhere below every kept expert (float32's lowest
    finite value) yet above a disabled one (-inf). Unmasked, the kept groups hold at least top_k
    experts and this is plain group masking; with experts switched off, a token whose kept groups
    hold fewer than top_k enabled ones takes the best of the others, never a disabled expert."""
    return jnp.where(kept, rank, jnp.minimum(rank, jnp.finfo(rank.dtype).min))


def sigmoid_topk(x: jax.Array, router_w: jax.Array, config: ModelConfig, disabled: jax.Array | None) -> Routing:
    """Sigmoid scores with a selection-only bias (DeepSeek-V3's "auxiliary-loss-free load balancing",
    Wang et al. 2024; also GLM-4.5 and MiniMax-M2): each expert's score is sigmoid(x @ W_router), an
    independent gate rather than a share of one softmax. A learned per-expert bias (`score_bias`, the
    checkpoints' `e_score_correction_bias`), adjusted during training to even out expert load, is
    added to the scores only to *choose* the top_k (within the best `topk_group` of `n_group` groups);
    the weights applied are the unbiased scores, renormalised to sum to 1 when `norm_topk_prob`, then
    times `routed_scaling_factor`. Disabled experts can never be chosen (`outside_groups_last`)."""
    c = config
    score_bias = hk.get_parameter("score_bias", [c.n_experts], jnp.float32, init=jnp.zeros)
    logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), router_w.astype(jnp.float32))
    scores = jax.nn.sigmoid(logits)                                                # [b, t, e]
    choice = scores + score_bias.astype(jnp.float32)
    if disabled is not None:
        choice = jnp.where(disabled, -jnp.inf, choice)
    if c.n_group > 1:
        choice = outside_groups_last(choice, group_mask(choice, c.n_group, c.topk_group, "top2_sum"))
    experts = jax.lax.top_k(choice, c.top_k)[1]                                    # [b, t, k]
    weights = jnp.take_along_axis(scores, experts, axis=-1)
    if c.norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return Routing(experts.astype(jnp.int32), weights * c.routed_scaling_factor, logits)


def topk_softmax(x: jax.Array, router_w: jax.Array, config: ModelConfig, disabled: jax.Array | None) -> Routing:
    """gpt-oss (OpenAI 2025): the router is a Linear layer with a bias (`router_bias`), and each token's
    top_k experts are chosen on the logits, their weights a softmax over those k logits alone. That is
    softmax-then-top-k renormalised (`route`) in exact arithmetic; it is computed here as transformers
    computes it. Disabled experts get a logit of -inf, so they are never chosen."""
    bias = hk.get_parameter("router_bias", [config.n_experts], jnp.float32, init=jnp.zeros)
    logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), router_w.astype(jnp.float32))
    logits = logits + bias.astype(jnp.float32)                                     # [b, t, e]
    if disabled is not None:
        logits = jnp.where(disabled, -jnp.inf, logits)
    top, experts = jax.lax.top_k(logits, config.top_k)                             # [b, t, k]
    return Routing(experts.astype(jnp.int32), jax.nn.softmax(top, axis=-1), logits)


def topk_sigmoid(x: jax.Array, router_w: jax.Array, config: ModelConfig, disabled: jax.Array | None) -> Routing:
    """Llama-4 (Meta 2025): each token's top_k experts are chosen on the logits x @ W_router, their weights
    sigmoid(logit) each, independent gates neither renormalised nor a share of a softmax. Llama-4 scales
    the expert's *input* by that weight (`ModelConfig.router_scales_input`, `moecli.model.moe`). Disabled
    experts get a logit of -inf, so they are never chosen."""
    logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), router_w.astype(jnp.float32))  # [b, t, e]
    if disabled is not None:
        logits = jnp.where(disabled, -jnp.inf, logits)
    top, experts = jax.lax.top_k(logits, config.top_k)                             # [b, t, k]
    return Routing(experts.astype(jnp.int32), jax.nn.sigmoid(top), logits)


def sparsemixer(x: jax.Array, router_w: jax.Array, config: ModelConfig, disabled: jax.Array | None) -> Routing:
    """SparseMixer-v2 routing at inference (Liu et al. 2024, "GRIN: GRadient-INformed MoE"; Phi-3.5-MoE),
    always top-2: the first expert is the best logit, its weight a softmax over only the experts whose
    logit is within a relative 2 x `sparsemixer_eps` of the best one (the others masked out, as the
    paper's training-time jitter would never pick them); the second is the best of the rest, its weight
    the same masked softmax around it with the first expert excluded. The weights do not sum to 1.
    (Training samples the experts and uses Heun's third-order gradient estimate: not here.) Disabled
    experts get a logit of -inf, so they are never chosen and weigh nothing."""
    logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), router_w.astype(jnp.float32))
    if disabled is not None:
        logits = jnp.where(disabled, -jnp.inf, logits)

    def pick(masked: jax.Array) -> tuple[jax.Array, jax.Array]:
        best = jnp.max(masked, axis=-1, keepdims=True)                            # [b, t, 1]
        expert = jnp.argmax(masked, axis=-1)[..., None]
        far = (best - logits) / jnp.maximum(jnp.abs(logits), best) > 2 * config.sparsemixer_eps
        gates = jax.nn.softmax(jnp.where(far, -jnp.inf, masked), axis=-1)        # [b, t, e]
        return expert, jnp.take_along_axis(gates, expert, axis=-1)

    first, w_first = pick(logits)
    second, w_second = pick(jnp.where(jax.nn.one_hot(first[..., 0], logits.shape[-1], dtype=bool), -jnp.inf, logits))
    experts = jnp.concatenate([first, second], axis=-1).astype(jnp.int32)        # [b, t, 2]
    return Routing(experts, jnp.concatenate([w_first, w_second], axis=-1), logits)


#: Router parameters kept in float32 whatever the weights' dtype (the loader reads this), as DeepSeek-V3
#: and GLM-4.5 keep them: the router decides near-ties between experts, which bfloat16's 8 mantissa
#: bits would blur, and it is a d_model x n_experts matrix, a negligible share of the bytes.
FLOAT32_PARAMS = frozenset({"router", "router_bias", "score_bias"})

#: config.router -> the router function; a family picks one by name.
ROUTERS = {"softmax_topk": softmax_topk, "sigmoid_topk": sigmoid_topk, "topk_softmax": topk_softmax,
           "topk_sigmoid": topk_sigmoid, "sparsemixer": sparsemixer}
