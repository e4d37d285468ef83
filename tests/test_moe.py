"""The MoE block's two routing modes: dropless (exact) and capacity (overflow dropped)."""
from __future__ import annotations

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moecli.model.config import ModelConfig
from moecli.model.moe import MoEBlock
from moecli.model.ops import XLA

E, K, D, F = 4, 2, 8, 12


def config(capacity_factor: float) -> ModelConfig:
    return ModelConfig(family="mixtral", vocab_size=16, d_model=D, n_layers=1, n_heads=2, n_kv_heads=1,
                       head_dim=4, d_ff=0, d_expert=F, n_experts=E, top_k=K, moe_layers=(True,),
                       capacity_factor=capacity_factor)


def block(capacity_factor: float):
    return hk.without_apply_rng(hk.transform(lambda x: MoEBlock(config(capacity_factor), XLA)(x)))


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, D))
    params = block(0.0).init(jax.random.PRNGKey(1), x)
    # A router skewed towards expert 0 so that capacity overflows.
    params["moe"]["router"] = params["moe"]["router"].at[:, 0].add(0.8)
    return x, params


def test_large_capacity_equals_dropless(setup):
    x, params = setup
    dropless, routing = block(0.0).apply(params, x)
    capacity, routing2 = block(E / K).apply(params, x)  # C = tokens: nothing can overflow
    np.testing.assert_allclose(np.asarray(capacity), np.asarray(dropless), atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.asarray(routing.experts), np.asarray(routing2.experts))


def expected_capacity_output(x, params, capacity_factor):
    """By hand in numpy: route, then let each expert take assignments first-come by token order
    (batch row, then position) until its capacity is full; the rest contribute nothing."""
    p = {k: np.asarray(v, np.float64) for k, v in params["moe"].items()}
    xs = np.asarray(x, np.float64).reshape(-1, D)
    tokens = xs.shape[0]
    capacity = math.ceil(capacity_factor * tokens * K / E)
    logits = xs @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    used = np.zeros(E, int)
    out = np.zeros_like(xs)
    dropped = 0
    for t in range(tokens):
        top = np.argsort(-probs[t])[:K]
        weights = probs[t, top] / probs[t, top].sum()
        for e, w in zip(top, weights):
            if used[e] >= capacity:
                dropped += 1
                continue
            used[e] += 1
            gate, up = xs[t] @ p["w_gate"][e], xs[t] @ p["w_up"][e]
            hidden = gate / (1 + np.exp(-gate)) * up
            out[t] += w * (hidden @ p["w_down"][e])
    return out.reshape(x.shape), dropped


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_small_capacity_drops_exactly_the_overflow(setup, capacity_factor):
    x, params = setup
    got, _ = block(capacity_factor).apply(params, x)
    want, dropped = expected_capacity_output(x, params, capacity_factor)
    assert dropped > 0  # the test means nothing unless something overflowed
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
    dropless, _ = block(0.0).apply(params, x)
    assert not np.allclose(np.asarray(got), np.asarray(dropless), atol=1e-3)


def test_scanned_decode_path_equals_dense(setup):
    """One token (decode) takes the scan-over-assignments path; it must equal the dense path."""
    x, params = setup
    full, _ = block(0.0).apply(params, x)
    for t in range(3):
        one, _ = block(0.0).apply(params, x[:1, t:t + 1])
        np.testing.assert_allclose(np.asarray(one)[0, 0], np.asarray(full)[0, t], atol=1e-5, rtol=0)


def test_capacity_formula():
    c = config(1.25)
    assert c.capacity(100) == math.ceil(1.25 * 100 * K / E)
    assert config(0.01).capacity(1) == 1


@pytest.mark.parametrize("tokens", [1, 3, 40, 300])
def test_fast_dropless_paths_equal_dense_reference(tokens):
    """The scanned (few tokens) and block-sparse (many tokens) paths against all-experts dense."""
    from moecli.model.experts import experts_blocked, experts_dense, experts_scanned
    from moecli.model.router import route

    key = jax.random.PRNGKey(tokens)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    n_experts, top_k = 6, 3
    x = jax.random.normal(k1, (tokens, D))
    w_gate, w_up = jax.random.normal(k2, (n_experts, D, F)), jax.random.normal(k3, (n_experts, D, F))
    w_down = jax.random.normal(k4, (n_experts, F, D))
    routing = route(x[None], jax.random.normal(k5, (D, n_experts)), top_k, True)
    flat = type(routing)(*(t[0] for t in routing))
    want = experts_dense(x, w_gate, w_up, w_down, flat, n_experts)
    for got in (experts_scanned(x, w_gate, w_up, w_down, flat, n_experts),
                experts_blocked(x, w_gate, w_up, w_down, flat, n_experts)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-3)
    # Expert ids >= n_local mean "on another device": skipped, as sharding renumbers them.
    n_local = 4
    elsewhere = flat._replace(experts=jnp.where(flat.experts < n_local, flat.experts, n_local),
                              weights=jnp.where(flat.experts < n_local, flat.weights, 0.0))
    want_local = experts_dense(x, w_gate, w_up, w_down, elsewhere._replace(
        experts=jnp.minimum(elsewhere.experts, n_experts - 1)), n_experts)
    for got in (experts_scanned(x, w_gate[:n_local], w_up[:n_local], w_down[:n_local], elsewhere, n_local, True),
                experts_blocked(x, w_gate[:n_local], w_up[:n_local], w_down[:n_local], elsewhere, n_local, True)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want_local), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("capacity_factor,last_layer_moe", [(0.0, True), (0.0, False), (1.0, True)])
def test_prefill_runs_the_last_feed_forward_for_the_logits_position_only(monkeypatch, capacity_factor, last_layer_moe):
    """With logits_at, the last layer's feed-forward block runs for that one position (dropless
    routing; with capacity every token must run): the same logits and cache as the full forward,
    and every token still routed."""
    import dataclasses

    from moecli.model.ops import experts_xla
    from moecli.model.transformer import init_cache, transformed

    c = ModelConfig(family="mixtral", vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                    n_experts=4, top_k=2, d_expert=24, d_ff=40, capacity_factor=capacity_factor,
                    moe_layers=(True, True, last_layer_moe))
    tokens_per_call = []
    counting = dataclasses.replace(XLA, experts=lambda n, *a: tokens_per_call.append(n) or experts_xla(n, *a))
    model = transformed(c, ops=counting)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (1, 16)), jnp.int32)
    params = model.init(jax.random.PRNGKey(0), ids)
    full_logits, full_cache, full_routing = model.apply(params, ids, init_cache(c, 1, 32))
    tokens_per_call.clear()
    for at in (15, 9):
        logits, cache, routing = model.apply(params, ids, init_cache(c, 1, 32), None, jnp.int32(at))
        np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(full_logits[:, at]), rtol=1e-5, atol=1e-5)
        for ours, theirs in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(full_cache)):
            np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(routing.experts), np.asarray(full_routing.experts))
    if capacity_factor == 0:  # the dropless MoE layers' sizes: all 16 tokens, but 1 in the last layer
        assert tokens_per_call == ([16, 16, 1] if last_layer_moe else [16, 16]) * 2
