"""The training losses: next-token cross-entropy and the two router losses that keep a Mixture of
Experts healthy (used by `moecli.training.train`)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moecli.model.experts import claim_rank


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position next-token loss -log p(target), in nats: [batch, seq]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def expert_fractions(experts: jax.Array, n_experts: int) -> jax.Array:
    """f_e: the fraction of routing assignments that went to each expert, per layer.

    experts: int [layers, ..., top_k] -> float32 [layers, n_experts], rows summing to 1."""
    one_hot = jax.nn.one_hot(experts, n_experts, dtype=jnp.float32)          # [layers, ..., k, E]
    return one_hot.reshape(experts.shape[0], -1, n_experts).mean(axis=1)


def load_balancing_loss(router_logits: jax.Array, experts: jax.Array) -> jax.Array:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021), averaged over the MoE layers.

    For each layer: aux = n_experts * sum_e f_e * P_e, where f_e is the fraction of the batch's
    routing assignments that chose expert e (the top-k picks, counted k per token and divided by
    k) and P_e the router's mean probability for e. Perfectly even routing, f_e = P_e =
    1/n_experts, gives exactly 1.0; routing that piles onto a few experts gives more (up to
    n_experts when every token picks one expert with certainty). f_e comes from a top-k and has no
    gradient; the gradient flows through P_e and pushes probability away from the experts that
    get more than their share. It is multiplied by a small coefficient (0.01) so it balances the
    load without overriding the language-modelling loss.

    router_logits: [layers, batch, seq, n_experts]; experts: [layers, batch, seq, top_k].
    """
    n_experts = router_logits.shape[-1]
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    mean_prob = probs.reshape(probs.shape[0], -1, n_experts).mean(axis=1)          # P: [layers, E]
    fraction = jax.lax.stop_gradient(expert_fractions(experts, n_experts))         # f: [layers, E]
    return jnp.mean(n_experts * jnp.sum(fraction * mean_prob, axis=-1))


def router_z_loss(router_logits: jax.Array) -> jax.Array:
    """ST-MoE's router z-loss (Zoph et al. 2022): the mean of logsumexp(router logits)^2.

    It keeps the router's logits small. Large logits make the softmax saturate (one expert gets
    probability ~1, its gradient vanishes) and, in low precision, round badly; penalising their
    log-partition function keeps routing soft and training stable, at almost no cost in quality.
    """
    z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)
    return jnp.mean(z ** 2)


def dropped_fraction(experts: jax.Array, capacity: int, n_experts: int) -> jax.Array:
    """Per layer, the fraction of routing assignments dropped by capacity routing: those past the
    first `capacity` claims on their expert, in token order (as `moecli.model.experts.experts_capacity`)."""
    rank = jax.vmap(lambda e: claim_rank(e, n_experts))(experts.reshape(experts.shape[0], -1))
    return jnp.mean((rank >= capacity).astype(jnp.float32), axis=-1)
