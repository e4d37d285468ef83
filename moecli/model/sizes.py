"""How many parameters and bytes each part of a model takes, how many bytes a token adds to its cache,
and which device holds what — from the config alone.

Shapes come from tracing the model's initialiser abstractly (`jax.eval_shape`, nothing allocated), so
they are exactly the parameters a checkpoint fills, quantized ones (`--quantize`) included, for any
family without a formula of its own; the cache's likewise from `init_cache`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from moecli.model.config import ModelConfig, QuantConfig
from moecli.model.fp8 import SUFFIXES as FP8_SUFFIXES
from moecli.model.sharding import partition_spec
from moecli.model.transformer import init_cache, transformed

#: What `ParameterCounts.active` counts, in words for the CLI.
ACTIVE_CONVENTION = "LM head included, embedding table not"


def parameter_shapes(config: ModelConfig) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """Shapes and dtypes of every parameter of the model, without allocating any (float ones as
    float32: the dtype they are loaded in is the caller's). Traced once per config (a 671 B-parameter
    model takes seconds); each call gets its own dicts."""
    return {module: dict(group) for module, group in _traced(config).items()}


@functools.lru_cache(maxsize=32)  # a few thousand shapes each
def _traced(config: ModelConfig) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    model = transformed(config)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))


class ParameterCounts(NamedTuple):
    """A model's parameters, a quantized weight counted as the weights it stands for (not its bytes)."""

    total: int      # every parameter the model holds
    active: int     # per token: total less the routed experts it does not choose and the embedding table
    embedding: int  # the embedding table `active` leaves out; 0 when it is the (tied) LM head too


def parameter_counts(config: ModelConfig) -> ParameterCounts:
    """Counted off the traced shapes of the float model (`--quantize` and packed checkpoints store the
    same weights in fewer bytes), so exact for every family. Per token, each MoE layer's stacked
    experts (the parameters expert parallelism splits, `partition_spec`) count top_k / n_experts of
    theirs. `active` follows OpenAI's convention for gpt-oss (3.6 B of gpt-oss-20b, 5.1 B of -120b):
    the LM head counts, since every token multiplies by all of it, the embedding table does not, since
    a token reads one row of it (`ACTIVE_CONVENTION`); batch-1 decoding reads `active` weights a token."""
    shapes = parameter_shapes(config.replace(quant=QuantConfig()))
    total = unchosen = 0
    for module, group in shapes.items():
        for param, shape in group.items():
            size = math.prod(shape.shape)
            total += size
            if partition_spec(module, param) != PartitionSpec():  # [n_experts, ...] of one MoE layer
                unchosen += size // config.n_experts * (config.n_experts - config.top_k)
    embedding = 0 if config.tie_embeddings else math.prod(shapes["transformer/embed"]["embeddings"].shape)
    return ParameterCounts(total, total - unchosen - embedding, embedding)


class CacheLayers(NamedTuple):
    """Layers whose caches grow alike: `layers` of them keep `bytes_per_token` each a cached token."""

    kind: str                # the cache type (`moecli.model.attention.ATTENTION`): KVCache, LatentCache, ...
    layers: int
    bytes_per_token: int
    window: int | None       # sliding-window layers: no token further back than this is ever read
    fixed_bytes: int = 0     # each one's bytes whatever the length (a recurrent state)


def kv_cache_bytes(config: ModelConfig, dtype) -> list[CacheLayers]:
    """What each layer's cache costs, grouped by kind: `init_cache`'s own per-layer caches (each
    attention kind's type) traced abstractly for one sequence of one and two positions, so a new cache
    kind is counted without a formula here. Grouped-query attention keeps 2 x n_kv_heads x head_dim
    values a token, latent attention kv_lora_rank + qk_rope_head_dim."""
    one, two = (jax.eval_shape(lambda n=n: init_cache(config, 1, n, dtype)).layers for n in (1, 2))
    groups: dict[tuple, int] = {}
    for i, (short, long) in enumerate(zip(one, two)):
        sizes = [sum(leaf.size * np.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(c))
                 for c in (short, long)]
        key = (type(short).__name__, sizes[1] - sizes[0], config.sliding_window if config.uses_window(i) else None,
               2 * sizes[0] - sizes[1])
        groups[key] = groups.get(key, 0) + 1
    return [CacheLayers(kind, n, per_token, window, fixed) for (kind, per_token, window, fixed), n in groups.items()]


def cache_bytes_at(groups: list[CacheLayers], tokens: int) -> int:
    """The whole cache's bytes for `tokens` tokens of context, sliding-window layers capped at their window."""
    return sum(g.layers * (g.fixed_bytes + g.bytes_per_token * min(tokens, g.window or tokens)) for g in groups)


def weight_bytes(config: ModelConfig, itemsize: int) -> tuple[int, int]:
    """(replicated bytes, expert bytes) of the weights with float parameters of `itemsize` bytes:
    quantized parameters count their integers and scales. Expert bytes are what expert parallelism
    splits over devices (`moecli.model.sharding`)."""
    replicated = experts = 0
    for module, group in parameter_shapes(config).items():
        for param, shape in group.items():
            size = int(np.prod(shape.shape))
            # Float parameters trace as float32 and load in the caller's dtype; quantized parts
            # (int8 / uint8 integers, float16 scales; MXFP4's uint8 blocks and scales; block-FP8's uint8
            # codes and float32 block scales) keep theirs.
            as_loaded = shape.dtype == jnp.float32 and not param.endswith(FP8_SUFFIXES[1])
            nbytes = size * (itemsize if as_loaded else shape.dtype.itemsize)
            if partition_spec(module, param) == PartitionSpec():
                replicated += nbytes
            else:
                experts += nbytes
    return replicated, experts


@dataclass
class DevicePlacement:
    device: str
    experts: tuple[int, int]  # [first, last] expert of every MoE layer on this device
    expert_bytes: int
    replicated_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.expert_bytes + self.replicated_bytes


def placement(config: ModelConfig, n_devices: int, itemsize: int,
              device_names: list[str] | None = None) -> list[DevicePlacement]:
    """Which experts of each MoE layer each device holds, and its parameter bytes — from the
    config alone (quantized bytes under `config.quant`), without loading or running the model."""
    replicated, experts = weight_bytes(config, itemsize)
    per_device = config.n_experts // n_devices if any(config.moe_layers) else 0
    names = device_names or [f"device {d}" for d in range(n_devices)]
    return [DevicePlacement(names[d], (d * per_device, (d + 1) * per_device - 1), experts // n_devices, replicated)
            for d in range(n_devices)]
