"""Putting checkpoint tensors onto devices as they are read (used by `moecli.checkpoint`).

On one device a parameter goes to the default device as soon as it is complete. With a mesh
(`moecli.sharding`) replicated parameters go to every device, and the stacked expert weights
[n_experts, ...] are split: each device's experts are gathered in a host buffer of their own,
[n_experts / n_devices, ...], which moves to that device once its last expert arrives and is then
freed. So neither the host nor any device ever holds the full stack — and in a multi-process run
each process keeps only the experts of its own devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from moecli.sharding import partition_spec, sharding_for


class Placer:
    def __init__(self, shapes: dict, dtype, mesh: Mesh | None = None):
        self.shapes, self.dtype, self.mesh = shapes, np.dtype(dtype), mesh
        self.devices = [jax.devices()[0]] if mesh is None else list(mesh.devices.flat)
        self.params: dict[str, dict[str, jax.Array]] = {m: {} for m in shapes}
        self.filled: dict[tuple[str, str], np.ndarray] = {}       # per stacked param: experts seen
        self.buffers: dict[tuple[str, str, int], np.ndarray] = {}  # per (param, device): its experts
        self.shards: dict[tuple[str, str], dict[int, jax.Array]] = {}

    def whole(self, module: str, param: str, array: np.ndarray) -> None:
        """A complete parameter (fused expert stacks included)."""
        array = array.astype(self.dtype)
        if self.mesh is None:
            self.params[module][param] = jnp.asarray(array)
        else:
            self.params[module][param] = jax.make_array_from_callback(
                array.shape, sharding_for(self.mesh, module, param), lambda index: array[index])

    def expert(self, module: str, param: str, e: int, array: np.ndarray) -> None:
        """Expert e's slice of a stacked [n_experts, ...] parameter."""
        shape = self.shapes[module][param].shape
        split = self.mesh is not None and partition_spec(module, param) != jax.sharding.PartitionSpec()
        per_device = shape[0] // len(self.devices) if split else shape[0]
        d = e // per_device
        filled = self.filled.setdefault((module, param), np.zeros(shape[0], bool))
        filled[e] = True
        if self.devices[d].process_index != jax.process_index():
            return  # another process's device: that process keeps it
        key = (module, param, d)
        if key not in self.buffers:
            self.buffers[key] = np.empty((per_device, *shape[1:]), self.dtype)
        self.buffers[key][e - d * per_device] = array
        if filled[d * per_device:(d + 1) * per_device].all():
            self._place(module, param, d, self.buffers.pop(key), split)

    def _place(self, module: str, param: str, d: int, block: np.ndarray, split: bool) -> None:
        if not split:
            self.whole(module, param, block)
            return
        shards = self.shards.setdefault((module, param), {})
        shards[d] = jax.device_put(block, self.devices[d])
        local = [i for i, dev in enumerate(self.devices) if dev.process_index == jax.process_index()]
        if sorted(shards) == local:
            self.params[module][param] = jax.make_array_from_single_device_arrays(
                self.shapes[module][param].shape, sharding_for(self.mesh, module, param),
                [shards[i] for i in local])
            del self.shards[(module, param)]

    def done(self, module: str, param: str) -> bool:
        return param in self.params[module]

    def first_missing_expert(self, module: str, param: str) -> int:
        filled = self.filled.get((module, param))
        return 0 if filled is None else int(np.argmin(filled))
