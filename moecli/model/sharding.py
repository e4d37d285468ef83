"""Experts spread over devices: expert parallelism with JAX's SPMD, on one host or many.

A `jax.sharding.Mesh` with one axis, "expert", spans the chosen devices (all processes' devices
when `jax.distributed` is initialised). Parameters are placed by path-regex rules over their
Haiku names (as in grok-1): the stacked expert weights [n_experts, ...] are split along their
first axis, so each device holds only n_experts / n_devices experts of every layer; everything
else (attention, norms, router, embeddings) is replicated.

The MoE block then runs under `shard_map`: every device routes all tokens (the router is
replicated), computes the assignments that fall on its own experts, and a `psum` over the
"expert" axis adds the partial outputs. This "replicated routing with a reduction" moves one
[tokens, d_model] activation per layer; the alternative, an all-to-all dispatch of tokens to
their experts' devices, moves less at large batch but more code; at batch-1 decoding the
activations are tiny either way.
"""
from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moecli.model.config import ModelConfig
from moecli.errors import ResourceError, UsageError
from moecli.model.router import Routing

AXIS = "expert"
# (regex over "module/param", PartitionSpec): the first match wins.
RULES: list[tuple[str, P]] = [
    (r"/moe/(w_gate|w_up|w_down)(_q|_scale|_blocks|_scales|_e4m3|_scale_inv)?$", P(AXIS)),  # stacked experts (or their packed parts)
    (r"/moe/(b_gate|b_up|b_down)$", P(AXIS)),                # their biases (gpt-oss), with them
    (r".*", P()),                               # everything else: replicated
]


def partition_spec(module: str, param: str) -> P:
    path = f"{module}/{param}"
    return next(spec for pattern, spec in RULES if re.search(pattern, path))


def default_devices(config: ModelConfig) -> int:
    """All devices of a multi-process run or of a local accelerator; one CPU device otherwise.
    Falls back to the largest count that divides the experts evenly."""
    available = jax.devices()
    if jax.process_count() == 1 and available[0].platform == "cpu":
        return 1
    n = len(available)
    while any(config.moe_layers) and config.n_experts % n:
        n -= 1
    return n


def make_mesh(config: ModelConfig, devices: int | None = None) -> Mesh | None:
    """A mesh over `devices` devices (None: `default_devices`), or None for a single device."""
    available = jax.devices()
    n = default_devices(config) if devices is None else devices
    if n < 1:
        raise UsageError(f"--devices must be at least 1, got {n}", "pass --devices 1 or more")
    if any(config.moe_layers) and config.n_experts % n:
        fits = [d for d in range(1, config.n_experts + 1) if config.n_experts % d == 0]
        raise UsageError(f"{config.n_experts} experts cannot be split evenly over {n} devices",
                         f"use --devices {', '.join(map(str, fits))}")
    if n > len(available):
        are = "is" if len(available) == 1 else "are"
        raise ResourceError(f"asked for {n} devices but only {len(available)} {are} available "
                            f"({available[0].platform})", f"pass --devices {len(available)} or fewer")
    if n == 1:
        return None
    if config.capacity_factor > 0:
        raise UsageError("capacity routing runs on one device", "use --devices 1 (or dropless routing)")
    return Mesh(np.array(available[:n]), (AXIS,))


def sharding_for(mesh: Mesh, module: str, param: str) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(module, param))


def shard_experts(fn, mesh: Mesh):
    """Run `fn(x, w_gate, w_up, w_down, routing, n_local_experts) -> y` on each device's experts
    and sum the partial outputs. Assignments to other devices' experts are renumbered to
    n_local_experts ("not here"), with gate weight 0, which `fn` skips. Per-expert biases, when
    given after the weights (`(x, experts, weights, w_gate, w_up, w_down, *biases)`), are split
    like them and reach `fn` as its `biases`."""
    def local(x, experts, weights, w_gate, w_up, w_down, *biases):
        n_local = jax.tree_util.tree_leaves(w_gate)[0].shape[0]  # a float stack or a QuantizedWeight's
        local_ids = experts - jax.lax.axis_index(AXIS) * n_local
        here = (local_ids >= 0) & (local_ids < n_local)
        routing = Routing(jax.numpy.where(here, local_ids, n_local), jax.numpy.where(here, weights, 0.0), None)
        extra = {"biases": biases} if biases else {}
        return jax.lax.psum(fn(x, w_gate, w_up, w_down, routing, n_local, elsewhere=True, **extra), AXIS)

    def run(x, experts, weights, *expert_arrays):
        specs = (P(), P(), P()) + (P(AXIS),) * len(expert_arrays)
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)(
            x, experts, weights, *expert_arrays)

    return run
