"""Putting checkpoint tensors onto devices as they are read (used by `moecli.checkpoints.loader`).

On one device a parameter goes to the default device as soon as it is complete. With a mesh
(`moecli.model.sharding`) replicated parameters go to every device, and the stacked expert weights
[n_experts, ...] are split: each device's experts are gathered in a host buffer of their own,
[n_experts / n_devices, ...], which moves to that device once its last expert arrives and is then
freed. So neither the host nor any device ever holds the full stack — and in a multi-process run
each process keeps only the experts of its own devices.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from moecli.model.sharding import partition_spec, sharding_for


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
        array = host_array(array, self.dtype)
        if self.mesh is None:
            self.params[module][param] = jax.device_put(array, self.devices[0])
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
            self.buffers[key] = aligned_empty((per_device, *shape[1:]), self.dtype)
        copy_into(self.buffers[key][e - d * per_device], array)
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


def aligned_empty(shape, dtype) -> np.ndarray:
    """np.empty, 64-byte aligned: on CPU, jax.device_put adopts such an array without copying it
    (numpy's own large arrays start 16 bytes into a page, and were copied)."""
    dtype = np.dtype(dtype)
    raw = np.empty(int(np.prod(shape)) * dtype.itemsize + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src, cast to dst's dtype. The checkpoint's [out, in] weights arrive as transposed
    views; those go through the CPU kernels' tiled transpose where it applies (numpy's copy of a
    transposed view reads one element per cache line: ~1 GB/s)."""
    untransposed = np.swapaxes(src, -1, -2) if src.ndim >= 2 else src
    if src.ndim >= 2 and not src.flags.c_contiguous and untransposed.flags.c_contiguous:
        from moecli.kernels.cpu import ffi as cpu_kernels

        if cpu_kernels.transpose_into(dst, untransposed):
            return
    np.copyto(dst, src, casting="unsafe")


def host_array(array: np.ndarray, dtype) -> np.ndarray:
    """`array` as a C-contiguous, 64-byte aligned array of `dtype`, copied only if it is not one."""
    if array.dtype == dtype and array.flags.c_contiguous and array.ctypes.data % 64 == 0:
        return array
    out = aligned_empty(array.shape, dtype)
    copy_into(out, array)
    return out
