"""Putting checkpoint tensors onto devices as they are read (used by `moecli.checkpoints.loader`).

On one device a parameter goes to the default device as soon as it is complete. With a mesh
(`moecli.model.sharding`) replicated parameters go to every device, and the stacked expert weights
[n_experts, ...] are split: each device's experts are gathered in a host buffer of their own,
[n_experts / n_devices, ...], which moves to that device once its last expert arrives and is then
freed. So neither the host nor any device ever holds the full stack — and in a multi-process run
each process keeps only the experts of its own devices.

With `quantization` (a QuantConfig: `--quantize`, or a quantized checkpoint's), each parameter `moecli.model.quant.bits_for` names is quantized as
it arrives — a whole tensor, or one expert's slice — and placed as its two parameters `{param}_q`
and `{param}_scale`: host memory holds the quantized model plus the one tensor being read.
MXFP4 experts (gpt-oss, `moecli.model.mxfp4`) are placed as the checkpoint packs them, `{param}_blocks`
and `{param}_scales`; block-FP8 experts (`moecli.model.fp8`) likewise, `{param}_e4m3` and `{param}_scale_inv`.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from moecli.checkpoints import mxfp4 as mxfp4_checkpoint
from moecli.model import fp8, mxfp4, quant
from moecli.model.router import FLOAT32_PARAMS
from moecli.model.sharding import partition_spec, sharding_for


class Placer:
    def __init__(self, shapes: dict, dtype, mesh: Mesh | None = None, quantization=None):
        self.shapes, self.dtype, self.mesh, self.quant = shapes, np.dtype(dtype), mesh, quantization
        self.devices = [jax.devices()[0]] if mesh is None else list(mesh.devices.flat)
        self.params: dict[str, dict[str, jax.Array]] = {m: {} for m in shapes}
        self.filled: dict[tuple[str, str], np.ndarray] = {}       # per stacked param: experts seen
        self.buffers: dict[tuple[str, str, int], np.ndarray] = {}  # per (param, device): its experts
        self.shards: dict[tuple[str, str], dict[int, jax.Array]] = {}

    def bits(self, module: str, param: str) -> int:
        """How many bits (module, param) is stored in (0: the float dtype)."""
        return quant.bits_for(f"{module}/{param}", self.quant) if self.quant else 0

    def mxfp4(self, module: str, param: str) -> bool:
        """Whether (module, param) is kept as MXFP4 (`quant.is_mxfp4`)."""
        return quant.is_mxfp4(f"{module}/{param}", self.quant)

    def fp8(self, module: str, param: str) -> bool:
        """Whether (module, param) is kept as block-FP8 (`quant.is_fp8`)."""
        return quant.is_fp8(f"{module}/{param}", self.quant)

    def put(self, module: str, param: str, expert: int | None, array) -> None:
        """A whole parameter (expert None) or one expert's slice of a stacked one."""
        if expert is None:
            self.whole(module, param, array)
        else:
            self.expert(module, param, expert, array)

    def stored(self, module: str, param: str, array) -> list[tuple[str, np.ndarray, np.dtype]]:
        """The parameters a tensor becomes, with their dtypes: a float tensor itself in the model's
        dtype, or its quantized pair (integers, float16 scales) as `quant.quantize` makes them; a
        quantized checkpoint's matrix (`Packed`) as it is, where it has the bits and group size
        this parameter is kept in, else dequantized first. An MXFP4 parameter takes a checkpoint's
        MXFP4 arrays as they are (a float tensor is rounded to MXFP4); MXFP4 arrays for a parameter kept
        in another format (`--quantize`) are dequantized first. A block-FP8 parameter takes a checkpoint's
        FP8Weight as it is (a float tensor is rounded to block-FP8)."""
        if self.fp8(module, param):
            w = array if isinstance(array, fp8.FP8Weight) else fp8.quantize(array, self.quant.block)
            return [(f"{param}{suffix}", part, dtype)
                    for suffix, part, dtype in zip(fp8.SUFFIXES, w, (np.uint8, np.float32))]
        if self.mxfp4(module, param):
            w = array if isinstance(array, mxfp4.MXFP4Weight) else mxfp4.quantize(array)
            return [(f"{param}{suffix}", part, np.uint8) for suffix, part in zip(mxfp4.SUFFIXES, w)]
        if isinstance(array, mxfp4.MXFP4Weight):
            array = mxfp4_checkpoint.dequantize(array)
        bits = self.bits(module, param)
        if hasattr(array, "scale"):  # a Packed matrix (moecli.checkpoints.quantized)
            if bits == array.bits and array.group == quant.group_size(array.shape[1], bits, self.quant.group):
                return [(f"{param}_q", array.q, array.q.dtype), (f"{param}_scale", array.scale, np.float16)]
            array = np.asarray(quant.dequantize(quant.QuantizedWeight(array.q, array.scale)))
        if not bits:
            return [(param, array, np.dtype(np.float32) if param in FLOAT32_PARAMS else self.dtype)]
        q, scale = quant.quantize(array, bits, self.quant.group)
        return [(f"{param}_q", q, q.dtype), (f"{param}_scale", scale, scale.dtype)]

    def whole(self, module: str, param: str, array: np.ndarray) -> None:
        """A complete parameter (fused expert stacks included)."""
        for name, part, dtype in self.stored(module, param, array):
            self._whole(module, name, host_array(part, dtype))

    def _whole(self, module: str, param: str, array: np.ndarray) -> None:
        if self.mesh is None:
            self.params[module][param] = jax.device_put(array, self.devices[0])
        else:
            self.params[module][param] = jax.make_array_from_callback(
                array.shape, sharding_for(self.mesh, module, param), lambda index: array[index])

    def expert(self, module: str, param: str, e: int, array: np.ndarray) -> None:
        """Expert e's slice of a stacked [n_experts, ...] parameter."""
        for name, part, dtype in self.stored(module, param, array):
            self._expert(module, name, e, part, dtype)

    def _expert(self, module: str, param: str, e: int, array: np.ndarray, dtype) -> None:
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
            self.buffers[key] = aligned_empty((per_device, *shape[1:]), dtype)
        copy_into(self.buffers[key][e - d * per_device], array)
        if filled[d * per_device:(d + 1) * per_device].all():
            self._place(module, param, d, self.buffers.pop(key), split)

    def _place(self, module: str, param: str, d: int, block: np.ndarray, split: bool) -> None:
        if not split:
            self._whole(module, param, block)
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
        """Whether the float parameter `param` (quantized: both its parts) is placed."""
        return all(name in self.params[module] for name in self.names(module, param))

    def names(self, module: str, param: str) -> tuple[str, ...]:
        if self.mxfp4(module, param):
            return tuple(f"{param}{suffix}" for suffix in mxfp4.SUFFIXES)
        if self.fp8(module, param):
            return tuple(f"{param}{suffix}" for suffix in fp8.SUFFIXES)
        return (f"{param}_q", f"{param}_scale") if self.bits(module, param) else (param,)

    def first_missing_expert(self, module: str, param: str) -> int:
        filled = self.filled.get((module, self.names(module, param)[0]))
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
