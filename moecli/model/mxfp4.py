"""MXFP4 weights: 4-bit floats in blocks of 32 that share a power-of-two scale, kept packed in memory.

What: the OCP Microscaling Formats (MX) Specification v1.0 (Open Compute Project, 2023; Rouhani et
al., "Microscaling Data Formats for Deep Learning", 2023) stores a tensor as blocks of k = 32
consecutive elements, each an FP4 E2M1 float (1 sign, 2 exponent and 1 mantissa bit: the values
0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives), and one shared E8M0 scale per block (an 8-bit
exponent, no sign and no mantissa: 2^(s - 127), s = 255 being NaN): w = e2m1 * 2^(s - 127).
4 bits a weight plus 8 bits a block: 4.25 bits a weight. A power-of-two scale is an exponent to add,
not a multiply to round, and the E2M1 grid spends its few values near zero where weights are.
OpenAI's gpt-oss-20b / gpt-oss-120b ship their experts only this way (`quant_method: "mxfp4"`).

Layout (the checkpoint's, kept as it is; what csrc/mxfp4_matvec.h reads), for a matrix in
moecli's [in, out] convention:
    blocks uint8 [..., out, in / 2]:  output j's inputs in order, two a byte: input 2i in byte i's
                                      low nibble, 2i + 1 in its high one (each an E2M1 code 0..15);
    scales uint8 [..., out, in / 32]: block b of output j covers inputs 32b .. 32b + 31.
Output-major, unlike `moecli.model.quant`'s [in, out] integers: each output is one dot product over
contiguous bytes, which is how the checkpoint stores it and how the kernel reads it, so loading
copies no byte into another order. Expert stacks add a leading [n_experts] axis to both, which
`take` indexes and expert parallelism splits (`moecli.model.sharding`). `dequantize` is the
pure-JAX reference: the float matrix [..., in, out] the kernels are tested against.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 32          # elements that share a scale (the spec's k)
SCALE_BIAS = 127    # E8M0: 2^(s - 127)
#: E2M1 code -> value; bit 3 is the sign (the table of transformers' integrations/mxfp4.py).
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
#: The dtype the kernels dispatch on (`moecli.model.quant.weight_dtype`).
DTYPE = jnp.float4_e2m1fn
#: The parameters an MXFP4 weight `name` is stored as.
SUFFIXES = ("_blocks", "_scales")


class MXFP4Weight(NamedTuple):
    """An MXFP4 matrix [..., in, out] (or a stack of them): E2M1 codes and E8M0 block scales,
    laid out as the module doc says."""

    blocks: jax.Array   # uint8 [..., out, in / 2]
    scales: jax.Array   # uint8 [..., out, in / 32]

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The float matrix's shape, [..., in, out]."""
        *lead, out, half = self.blocks.shape
        return (*lead, 2 * half, out)


def packed_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (blocks, scales) shapes for a float matrix of `shape` [..., in, out]."""
    *lead, d_in, d_out = shape
    if d_in % BLOCK:
        raise ValueError(f"MXFP4 needs an input size that is a multiple of {BLOCK}, got {d_in}")
    return (*lead, d_out, d_in // 2), (*lead, d_out, d_in // BLOCK)


def get_parameters(name: str, shape: list[int]) -> MXFP4Weight:
    """hk.get_parameter for the two parameters `{name}_blocks` and `{name}_scales` of a matrix of
    `shape` [..., in, out] (filled from a checkpoint; the initialisers only give shapes)."""
    import haiku as hk

    blocks, scales = packed_shapes(tuple(shape))
    return MXFP4Weight(hk.get_parameter(f"{name}{SUFFIXES[0]}", blocks, jnp.uint8, init=jnp.zeros),
                       hk.get_parameter(f"{name}{SUFFIXES[1]}", scales, jnp.uint8, init=jnp.zeros))


def take(w: MXFP4Weight, e) -> MXFP4Weight:
    """Expert e's matrix of a stack."""
    return MXFP4Weight(w.blocks[e], w.scales[e])


def dequantize(w: MXFP4Weight, dtype=jnp.float32) -> jax.Array:
    """The float matrix [..., in, out]: FP4_VALUES[code] * 2^(s - 127), as transformers'
    `convert_moe_packed_tensors` computes it (by ldexp), except that XLA flushes float32's
    subnormals to zero: the few values below 2^-126 (scales s = 0 and 1 only) come out 0."""
    table = jnp.asarray(FP4_VALUES)
    blocks = w.blocks
    *lead, out, half = blocks.shape
    codes = jnp.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*lead, out, half // 16, BLOCK)
    values = jnp.ldexp(table[codes], w.scales.astype(jnp.int32)[..., None] - SCALE_BIAS)  # [..., out, in/32, 32]
    return jnp.swapaxes(values.reshape(*lead, out, 2 * half), -1, -2).astype(dtype)


# --- numpy, for the loader and the tests --------------------------------------------------------------------

_MIDPOINTS = (np.abs(FP4_VALUES[:7]) + np.abs(FP4_VALUES[1:8])) / 2   # between magnitude codes i and i + 1


def quantize(w: np.ndarray) -> MXFP4Weight:
    """Round w [..., in, out] to MXFP4 (numpy arrays), as the OCP spec's conversion does: each block's
    scale 2^(floor(log2(max |w|)) - 2) (2: the largest E2M1 exponent, so max |w| lands in [4, 8) and
    values past 6 saturate to 6), then each element to the nearest E2M1 value, ties to the even code."""
    w = np.swapaxes(np.asarray(w, np.float32), -1, -2)                       # [..., out, in]
    *lead, out, d_in = w.shape
    packed_shapes((*lead, d_in, out))
    g = w.reshape(*lead, out, d_in // BLOCK, BLOCK)
    amax = np.abs(g).max(axis=-1)
    exponent = np.where(amax > 0, np.frexp(amax)[1] - 1 - 2, -SCALE_BIAS)   # frexp: amax = m 2^e, m in [0.5, 1)
    exponent = np.clip(exponent, -SCALE_BIAS, SCALE_BIAS)
    scaled = np.abs(np.ldexp(g, -exponent[..., None].astype(np.int32)))
    code = np.searchsorted(_MIDPOINTS, scaled, side="left")                   # 0..7; a midpoint: the lower code
    tie = (code < 7) & (scaled == _MIDPOINTS[np.minimum(code, 6)])
    code = np.where(tie & (code % 2 == 1), code + 1, code)
    code = np.where((g < 0) & (code > 0), code | 8, code).astype(np.uint8).reshape(*lead, out, d_in)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return MXFP4Weight(np.ascontiguousarray(blocks, np.uint8), np.ascontiguousarray(exponent + SCALE_BIAS, np.uint8))


def select_outputs(w: MXFP4Weight, index) -> MXFP4Weight:
    """The matrix's outputs `index` (a slice along the out axis: a fused gate_up tensor's part),
    copied into contiguous arrays: whole output rows of bytes, never a float value."""
    return MXFP4Weight(np.ascontiguousarray(w.blocks[..., index, :]), np.ascontiguousarray(w.scales[..., index, :]))
