"""The Mixture-of-Experts block: a router over stacked experts, plus optional shared experts.

The router kind (`config.router`) and the dropless experts implementation (the backend's
`Ops.experts`) are parts; this module only wires them. See `moecli.model.experts` for what the
experts compute and the two routing modes (dropless and capacity). The backends' expert kernels
compute plain SwiGLU without biases; experts with another gating or with biases (gpt-oss) take the
backend's `Ops.gated_experts` (`uses_kernels`): the pure-JAX implementations, or for MXFP4 weights on
CPU the packed matrix-vector kernel with the gating and biases in JAX.
"""
from __future__ import annotations

import functools

import haiku as hk
import jax
import jax.numpy as jnp

from moecli.model.config import ModelConfig
from moecli.model.experts import GLUS, experts_capacity
from moecli.model.linear import Linear
from moecli.model.mlp import MLP
from moecli.model.ops import Ops
from moecli.model.quant import get_weight, weight_dtype
from moecli.model.router import ROUTERS, Routing
from moecli.model.sharding import shard_experts


def uses_kernels(config: ModelConfig) -> bool:
    """Whether the backend's experts (`Ops.experts`, kernels included) compute this config's experts:
    only plain SwiGLU without biases; anything else runs the pure-JAX experts."""
    return config.expert_act == "swiglu" and not config.expert_bias


def scaled_inputs(xs: jax.Array, flat: Routing) -> tuple[jax.Array, Routing]:
    """Routing that scales the experts' inputs, not their outputs (Llama-4, `router_scales_input`): each of
    a token's top_k assignments becomes a token of its own, x * weight [tokens * top_k, d], sent to its
    one expert at weight 1, so any experts implementation (kernels, devices) computes expert(x * w); the
    caller sums each token's top_k outputs. A SwiGLU is not linear: expert(w x) != w expert(x)."""
    n, k = flat.experts.shape
    scaled = xs.astype(jnp.float32)[:, None, :] * flat.weights[..., None]            # [n, k, d]
    ones = jnp.ones((n * k, 1), flat.weights.dtype)
    return (scaled.astype(xs.dtype).reshape(n * k, -1),
            Routing(flat.experts.reshape(n * k, 1), ones, jnp.repeat(flat.logits, k, axis=0)))


class MoEBlock(hk.Module):
    """Router + stacked experts (+ optional shared expert). Returns (output, Routing)."""

    def __init__(self, config: ModelConfig, ops: Ops, mesh=None, name: str = "moe"):
        super().__init__(name=name)
        self.c, self.ops, self.mesh = config, ops, mesh  # mesh: experts split over devices (moecli.model.sharding)

    def __call__(self, x: jax.Array, disabled: jax.Array | None = None,
                 keep: jax.Array | None = None) -> tuple[jax.Array, Routing]:
        """x [batch, seq, d] -> (y, Routing of every token). With `keep` (an int32 position; dropless
        routing only), y [batch, 1, d] is that one position's output: every token is routed (the
        routing views see them all), only the kept one runs its experts."""
        c = self.c
        batch, seq, d = x.shape
        router_w = hk.get_parameter("router", [d, c.n_experts], init=hk.initializers.TruncatedNormal(0.02))
        init = hk.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal")
        # [e, d, f], [e, d, f], [e, f, d]; each a QuantizedWeight under --quantize (moecli.model.quant)
        w_gate = get_weight("w_gate", [c.n_experts, d, c.d_expert], jnp.float32, init, c.quant)
        w_up = get_weight("w_up", [c.n_experts, d, c.d_expert], jnp.float32, init, c.quant)
        w_down = get_weight("w_down", [c.n_experts, c.d_expert, d], jnp.float32, init, c.quant)
        biases = ()
        if c.expert_bias:  # [e, f], [e, f], [e, d]: split over devices like the weights
            biases = tuple(hk.get_parameter(name, [c.n_experts, size], init=jnp.zeros)
                           for name, size in (("b_gate", c.d_expert), ("b_up", c.d_expert), ("b_down", d)))
        glu = GLUS[c.expert_act](c)

        routing = ROUTERS[c.router](x, router_w, c, disabled)
        used = routing
        if keep is not None:
            assert c.capacity_factor == 0, "capacity couples the tokens: every one must run"
            x = jax.lax.dynamic_slice_in_dim(x, keep, 1, axis=1)
            used = Routing(*(jax.lax.dynamic_slice_in_dim(t, keep, 1, axis=1) for t in routing))
            batch, seq, d = x.shape
        flat = Routing(*(t.reshape(batch * seq, -1) for t in used))
        xs = x.reshape(batch * seq, d)
        tokens, top_k = batch * seq, c.top_k
        if c.router_scales_input:  # every assignment a token of its own, [tokens * top_k, d]
            (xs, flat), tokens, top_k = scaled_inputs(xs, flat), tokens * top_k, 1
        if c.capacity_factor > 0:
            y = experts_capacity(xs, w_gate, w_up, w_down, flat, c.capacity(batch * seq), c.n_experts,
                                 glu, biases or None)
        else:
            pick = self.ops.experts if uses_kernels(c) else self.ops.gated_experts
            experts = pick(tokens, top_k, c.n_experts, weight_dtype(w_gate))
            if not uses_kernels(c):  # another gating, or biases: Ops.gated_experts
                experts = functools.partial(experts, glu=glu)
            if self.mesh is None:
                y = experts(xs, w_gate, w_up, w_down, flat, c.n_experts, **({"biases": biases} if biases else {}))
            else:  # the biases, split like the weights, reach each device's experts with them
                y = shard_experts(experts, self.mesh)(xs, flat.experts, flat.weights, w_gate, w_up, w_down, *biases)
        y = y.reshape(batch, seq, -1, d).sum(axis=2)                     # a token's assignments (scaled inputs)

        if c.d_shared_expert:
            shared = MLP(d, c.d_shared_expert, self.ops, c.quant, name="shared_expert", bias=c.mlp_bias)(x)
            if c.shared_expert_gate:
                gate = Linear(1, self.ops, with_bias=False, name="shared_expert_gate")(x)
                shared = jax.nn.sigmoid(gate.astype(jnp.float32)).astype(x.dtype) * shared
            y = y + shared
        return y, routing
