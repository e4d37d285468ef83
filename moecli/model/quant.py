"""Group-wise weight quantization: 8-bit (q8) and 4-bit (q4) integers with a scale per group.

At batch 1, decoding streams every active weight through memory once per token, so bytes per
weight set the speed, and the total bytes set which machines can hold the model. Quantization
stores each weight as a small integer and a shared scale: w ~= q * scale, with one scale per
`group` consecutive weights along the input dimension (32 here, as llama.cpp's Q8_0/Q4_0 and the
W4A16 checkpoints on the Hub). Small groups follow the weights' local magnitude: one outlier
spoils only its own 32 weights' resolution, where one scale per row would spoil the whole row.
Symmetric rounding to nearest, scale = max|w| / qmax (127 for q8, 7 for q4; the q4 grid is
-8..7, so -8 is never produced), and no zero point.

Layout (what the kernels read; `moecli.kernels.cpu.csrc`), for a matrix in moecli's [in, out]:
    q8: q int8 [in, out];       scale float16 [in / group, out]
    q4: q uint8 [in / 2, out];  byte row i = rows 2i (low nibble) and 2i + 1 (high nibble), each
        stored as value + 8;    scale float16 [in / group, out]
Expert stacks add a leading [n_experts] axis to both. Activations stay in float: the weights are
unpacked and scaled in registers (kernels) or dequantized first (`dequantize`, the reference).
A checkpoint's MXFP4 experts (gpt-oss) are another packed kind, `moecli.model.mxfp4.MXFP4Weight`, and
a block-FP8 checkpoint's experts (DeepSeek-V3, Qwen3-FP8, ...) a third, `moecli.model.fp8.FP8Weight`:
`get_weight`, `dense`, `take` and `weight_dtype` below take any of them.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moecli.model import fp8, mxfp4
from moecli.model.fp8 import FP8Weight
from moecli.model.mxfp4 import MXFP4Weight

GROUP = 32
QMAX = {8: 127, 4: 7}

#: (regex over "module/param", what it is): the parameters `--quantize` turns into integers. The
#: router, norms, embeddings and biases stay as they are: small, and the router's choices and the
#: norms' scales are where rounding hurts most.
RULES = (
    (r"/moe/(w_gate|w_up|w_down)$", "experts"),
    # (latent attention's kv_b_proj stays float: decoding folds it into the query and output)
    (r"/(q_proj|k_proj|v_proj|o_proj|q_a_proj|q_b_proj|kv_a_proj|gate_proj|up_proj|down_proj)/w$", "dense"),
    (r"^transformer/lm_head$", "lm_head"),
)


class QuantizedWeight(NamedTuple):
    """A quantized matrix (or stack of them): integers and their group scales (see the module doc)."""

    q: jax.Array      # int8 [..., in, out] (q8) or uint8 [..., in / 2, out] (q4)
    scale: jax.Array  # float16 [..., in / group, out]

    @property
    def bits(self) -> int:
        return 8 if self.q.dtype == jnp.int8 else 4


def kind_for(path: str) -> str | None:
    """Which kind of RULES `module/param` is ("experts", "dense", "lm_head"), or None (stays float)."""
    return next((kind for pattern, kind in RULES if re.search(pattern, path)), None)


def bits_for(path: str, config) -> int:
    """How many bits `module/param` is stored in under `config` (a QuantConfig; 0: stays float)."""
    kind = kind_for(path)
    return getattr(config, kind) if kind else 0


def is_mxfp4(path: str, config) -> bool:
    """Whether `module/param` is an MXFP4 weight under `config` (its experts, `experts_format`)."""
    return bool(config) and config.experts_format == "mxfp4" and kind_for(path) == "experts"


def is_fp8(path: str, config) -> bool:
    """Whether `module/param` is a block-FP8 weight under `config` (its experts, `experts_format`)."""
    return bool(config) and config.experts_format == "fp8" and kind_for(path) == "experts"


def group_size(d_in: int, bits: int, group: int = GROUP) -> int:
    """`group` (32 unless a checkpoint says otherwise), or for an input size it does not divide
    (tiny test models) the largest power of two that does (at least 2 for q4, whose bytes pair rows)."""
    while group > 1 and d_in % group:
        group //= 2
    return max(group, 2 if bits == 4 else 1)


def get_weight(name: str, shape: list[int], dtype, init, quant=None):
    """hk.get_parameter for a weight that may be stored as integers: the float parameter, or, when
    the config's QuantConfig `quant` covers this module's parameter (`bits_for`), a QuantizedWeight
    of the parameters `{name}_q` and `{name}_scale` (MXFP4 experts: an MXFP4Weight)."""
    import haiku as hk

    path = f"{hk.experimental.current_name()}/{name}"
    if is_mxfp4(path, quant):
        return mxfp4.get_parameters(name, shape)
    if is_fp8(path, quant):
        return fp8.get_parameters(name, shape, quant.block)
    bits = bits_for(path, quant) if quant else 0
    group = quant.group if quant else GROUP
    if not bits:
        return hk.get_parameter(name, shape, dtype, init=init)
    q_shape, scale_shape = quantized_shapes(tuple(shape), bits, group)
    return QuantizedWeight(hk.get_parameter(f"{name}_q", q_shape, jnp.int8 if bits == 8 else jnp.uint8,
                                            init=jnp.zeros),
                           hk.get_parameter(f"{name}_scale", scale_shape, jnp.float16, init=jnp.ones))


#: The suffixes of a packed weight's stored parameters: a QuantizedWeight's, an MXFP4Weight's, an FP8Weight's.
STORED_SUFFIXES = ("_q", "_scale", *mxfp4.SUFFIXES, *fp8.SUFFIXES)


def float_name(param: str) -> str:
    """The weight a stored parameter is part of: w_gate for w_gate_q, w_gate_scale, w_gate_blocks, ..."""
    return next((param.removesuffix(s) for s in STORED_SUFFIXES if param.endswith(s)), param)


def quantized_shapes(shape: tuple[int, ...], bits: int, group: int = GROUP) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (q, scale) shapes for a float parameter of `shape` [..., in, out]."""
    *lead, d_in, d_out = shape
    rows = d_in // 2 if bits == 4 else d_in
    return (*lead, rows, d_out), (*lead, d_in // group_size(d_in, bits, group), d_out)


def quantize(w: np.ndarray, bits: int, group: int = GROUP) -> tuple[np.ndarray, np.ndarray]:
    """Round w [..., in, out] (any float dtype) to (q, scale) in the layout above, in numpy, one
    tensor at a time (the loader streams the checkpoint through this)."""
    *lead, d_in, d_out = w.shape
    group = group_size(d_in, bits, group)
    if bits == 4 and d_in % 2:
        raise ValueError(f"q4 needs an even input size, got {d_in}")
    w = np.asarray(w, np.float32).reshape(*lead, d_in // group, group, d_out)
    scale = (np.abs(w).max(axis=-2) / QMAX[bits]).astype(np.float16)          # [..., groups, out]
    safe = np.where(scale == 0, 1, scale.astype(np.float32))[..., None, :]
    q = np.clip(np.rint(w / safe), -QMAX[bits] - (bits == 4), QMAX[bits]).reshape(*lead, d_in, d_out)
    return pack(q, bits), scale


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """The float matrix [..., in, out] a QuantizedWeight stands for: the reference the kernels are
    tested against, and the path for gradients and for backends without quantized kernels."""
    q = w.q
    if w.bits == 4:
        low = (q & 15).astype(jnp.int8) - 8
        high = (q >> 4).astype(jnp.int8) - 8
        q = jnp.stack([low, high], axis=-2).reshape(*q.shape[:-2], q.shape[-2] * 2, q.shape[-1])
    groups = w.scale.shape[-2]
    grouped = q.astype(jnp.float32).reshape(*q.shape[:-2], groups, -1, q.shape[-1])
    return (grouped * w.scale.astype(jnp.float32)[..., None, :]).reshape(q.shape).astype(dtype)


def weight_dtype(w):
    """The dtype a kernel dispatches on: the float dtype, the integers' (int8 q8, uint8 q4), or
    float4_e2m1fn for MXFP4 (`mxfp4.DTYPE`), float8_e4m3fn for block-FP8 (`fp8.DTYPE`)."""
    if isinstance(w, MXFP4Weight):
        return jnp.dtype(mxfp4.DTYPE)
    if isinstance(w, FP8Weight):
        return jnp.dtype(fp8.DTYPE)
    return w.q.dtype if isinstance(w, QuantizedWeight) else w.dtype


def is_packed(w) -> bool:
    """Whether w is stored packed (integers, MXFP4 or block-FP8) rather than as a float array."""
    return isinstance(w, (QuantizedWeight, MXFP4Weight, FP8Weight))


def dense(w, dtype) -> jax.Array:
    """w as a float array of `dtype`: dequantized if quantized, else as it is."""
    if isinstance(w, MXFP4Weight):
        return mxfp4.dequantize(w, dtype)
    if isinstance(w, FP8Weight):
        return fp8.dequantize(w, dtype)
    return dequantize(w, dtype) if isinstance(w, QuantizedWeight) else w


def take(w, e):
    """Expert e's matrix of a stacked parameter, quantized or not."""
    if isinstance(w, MXFP4Weight):
        return mxfp4.take(w, e)
    if isinstance(w, FP8Weight):
        return fp8.take(w, e)
    return QuantizedWeight(w.q[e], w.scale[e]) if isinstance(w, QuantizedWeight) else w[e]


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers [..., in, out] (-128..127 or -8..7) in the layout above: int8 as they are, or two
    4-bit values a byte (for checkpoints that arrive quantized: compressed-tensors)."""
    if bits == 8:
        return values.astype(np.int8)
    nibbles = (values.astype(np.int16) + 8).astype(np.uint8)
    return (nibbles[..., 0::2, :] | (nibbles[..., 1::2, :] << 4)).astype(np.uint8)
