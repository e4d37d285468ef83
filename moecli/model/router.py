"""Routers: which experts each token goes to, and with what weight. All in float32: bfloat16
router logits make near-ties flip experts.

A router kind is a function (x [batch, seq, d], router weights [d, n_experts], config, disabled)
-> Routing; `moecli.model.parts.ROUTERS` names them for the families."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moecli.model.config import ModelConfig


class Routing(NamedTuple):
    """What the router decided for each token of one MoE layer."""

    experts: jax.Array  # int32 [batch, seq, top_k], best first
    weights: jax.Array  # float32 [batch, seq, top_k], the gate weights applied
    logits: jax.Array   # float32 [batch, seq, n_experts], for auxiliary losses and views


def route(x: jax.Array, router_w: jax.Array, top_k: int, renormalise: bool,
          disabled: jax.Array | None = None) -> Routing:
    """Token-choice routing, softmax then top-k (Shazeer et al. 2017; Mixtral, Qwen-MoE, OLMoE):
    probabilities = softmax(x @ W_router); each token keeps its top_k experts and their
    probabilities, renormalised to sum to 1 when `renormalise` (`norm_topk_prob`).

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




def softmax_topk(x: jax.Array, router_w: jax.Array, config: ModelConfig, disabled: jax.Array | None) -> Routing:
    """`route` with the config's top_k and norm_topk_prob."""
    return route(x, router_w, config.top_k, config.norm_topk_prob, disabled)


#: config.router -> the router function; a family picks one by name.
ROUTERS = {"softmax_topk": softmax_topk}
