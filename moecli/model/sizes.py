"""How many bytes each part of a model takes, and which device holds what — from the config alone.

Shapes come from tracing the model's initialiser abstractly (`jax.eval_shape`, nothing allocated), so
they are exactly the parameters a checkpoint fills, quantized ones (`--quantize`) included.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from moecli.model.config import ModelConfig
from moecli.model.sharding import partition_spec
from moecli.model.transformer import transformed


def parameter_shapes(config: ModelConfig) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """Shapes and dtypes of every parameter of the model, without allocating any (float ones as
    float32: the dtype they are loaded in is the caller's)."""
    model = transformed(config)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))


def weight_bytes(config: ModelConfig, itemsize: int) -> tuple[int, int]:
    """(replicated bytes, expert bytes) of the weights with float parameters of `itemsize` bytes:
    quantized parameters count their integers and scales. Expert bytes are what expert parallelism
    splits over devices (`moecli.model.sharding`)."""
    replicated = experts = 0
    for module, group in parameter_shapes(config).items():
        for param, shape in group.items():
            size = int(np.prod(shape.shape))
            # Float parameters trace as float32 and load in the caller's dtype; quantized parts
            # (int8 / uint8 integers, float16 scales) keep theirs.
            nbytes = size * (itemsize if shape.dtype == jnp.float32 else shape.dtype.itemsize)
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
