"""Block-FP8 weights: e4m3 floats with a float32 scale per block of the matrix, kept packed in memory.

What: the format DeepSeek-V3/R1, Kimi-K2, MiniMax-M2 and the Qwen3 "-FP8" releases ship
(`moecli.checkpoints.fp8` reads it). Each weight is a float8_e4m3fn byte (1 sign, 4 exponent and 3
mantissa bits, bias 7: up to +-448, subnormals down to 2^-9, no infinities, NaN at 0x7f / 0xff), and
each (bo x bi) block of the torch-style [out, in] matrix shares one float32 factor:
    w[i, j] = e4m3(weight[i, j]) * scale[i // bo, j // bi]
(DeepSeek-V3 technical report, Liu et al. 2024, section 3.3 "fine-grained quantization": one outlier
costs resolution in its own tile only). 1 byte a weight plus 4 bytes a block (a 128x128 block: 8.002
bits a weight): half of bfloat16's bytes, and decoding is bound by how fast the weights stream.

Layout (the checkpoint's, kept as it is; what csrc/fp8_matvec.h reads), for a matrix in moecli's
[in, out] convention:
    weight uint8 [..., out, in]:                         output j's e4m3 codes, inputs in order;
    scale  float32 [..., ceil(out / bo), ceil(in / bi)]: the block grid (the last block row and
                                                         column may be partial).
Output-major, as `moecli.model.mxfp4`'s MXFP4 experts: each output is one dot product over contiguous
bytes. Expert stacks add a leading [n_experts] axis to both, which `take` indexes and expert
parallelism splits (`moecli.model.sharding`). The block (bo, bi) is static (the config's
`QuantConfig.block`), carried by the FP8Weight as pytree metadata, not as an array. `dequantize` is
the pure-JAX reference, the float matrix [..., in, out] the kernels are tested against and what every
backend without an FP8 kernel multiplies (`moecli.model.quant.dense`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

#: The dtype the kernels dispatch on (`moecli.model.quant.weight_dtype`).
DTYPE = jnp.float8_e4m3fn
#: The parameters an FP8 weight `name` is stored as: its codes, then its block scales.
SUFFIXES = ("_e4m3", "_scale_inv")
E4M3_MAX = 448.0


def grid(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """The scale grid of a [rows, cols] matrix: ceil of each over the block."""
    return -(-rows // block[0]), -(-cols // block[1])


@jax.tree_util.register_pytree_node_class
class FP8Weight:
    """A block-FP8 matrix [..., in, out] (or a stack of them): e4m3 codes and float32 block scales,
    laid out as the module doc says; `block` (bo, bi) is static metadata."""

    __slots__ = ("block", "scale", "weight")

    def __init__(self, weight, scale, block: tuple[int, int]):
        self.weight = weight   # uint8 [..., out, in]
        self.scale = scale     # float32 [..., ceil(out / bo), ceil(in / bi)]
        self.block = (int(block[0]), int(block[1]))

    def tree_flatten(self):
        return (self.weight, self.scale), self.block

    @classmethod
    def tree_unflatten(cls, block, children):
        return cls(*children, block)

    def __iter__(self):  # the stored parts, in SUFFIXES' order (the loader places them so)
        return iter((self.weight, self.scale))

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """The float matrix's shape, [..., in, out]."""
        *lead, out, d_in = self.weight.shape
        return (*lead, d_in, out)


def packed_shapes(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (weight, scale) shapes for a float matrix of `shape` [..., in, out]."""
    *lead, d_in, d_out = shape
    return (*lead, d_out, d_in), (*lead, *grid(d_out, d_in, block))


def get_parameters(name: str, shape: list[int], block: tuple[int, int]) -> FP8Weight:
    """hk.get_parameter for `{name}_e4m3` and `{name}_scale_inv` of a matrix of `shape` [..., in, out]
    (filled from a checkpoint; the initialisers only give shapes)."""
    import haiku as hk

    weight, scale = packed_shapes(tuple(shape), block)
    return FP8Weight(hk.get_parameter(f"{name}{SUFFIXES[0]}", weight, jnp.uint8, init=jnp.zeros),
                     hk.get_parameter(f"{name}{SUFFIXES[1]}", scale, jnp.float32, init=jnp.ones), block)


def take(w: FP8Weight, e) -> FP8Weight:
    """Expert e's matrix of a stack."""
    return FP8Weight(w.weight[e], w.scale[e], w.block)


def dequantize(w: FP8Weight, dtype=jnp.float32) -> jax.Array:
    """The float matrix [..., in, out]: each e4m3 code as float32 (exact) times its block's scale, in
    float32, rounded once into `dtype` (transformers' `Fp8Dequantize`, `moecli.checkpoints.fp8`)."""
    out, d_in = w.weight.shape[-2:]
    values = jax.lax.bitcast_convert_type(w.weight, jnp.float8_e4m3fn).astype(jnp.float32)   # [..., out, in]
    bo, bi = w.block
    scale = jnp.repeat(jnp.repeat(w.scale.astype(jnp.float32), bo, axis=-2), bi, axis=-1)[..., :out, :d_in]
    return jnp.swapaxes(values * scale, -1, -2).astype(dtype)


# --- numpy, for the loader and the tests --------------------------------------------------------------------

def quantize(w: np.ndarray, block: tuple[int, int]) -> FP8Weight:
    """Round w [..., in, out] to block-FP8 (numpy arrays) as the Hub's quantizers do: per block
    s = amax / 448 (1 for an all-zero block), codes e4m3(w / s) rounded to nearest even (ml_dtypes)."""
    import ml_dtypes

    w = np.swapaxes(np.asarray(w, np.float32), -1, -2)                     # [..., out, in]
    *lead, out, d_in = w.shape
    rows, cols = grid(out, d_in, block)
    padded = np.zeros((*lead, rows * block[0], cols * block[1]), np.float32)
    padded[..., :out, :d_in] = w
    tiles = padded.reshape(*lead, rows, block[0], cols, block[1])
    scale = np.abs(tiles).max(axis=(-3, -1)) / E4M3_MAX                      # [..., rows, cols]
    scale = np.where(scale == 0, 1, scale).astype(np.float32)
    expanded = np.repeat(np.repeat(scale, block[0], -2), block[1], -1)[..., :out, :d_in]
    codes = (w / expanded).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    return FP8Weight(np.ascontiguousarray(codes), scale, block)


def select_outputs(w: FP8Weight, index: slice) -> FP8Weight:
    """The matrix's outputs `index` (a slice along the out axis, step 1, starting on a block row: a fused
    gate_up stack's half), copied into contiguous arrays with their block rows: no value is rounded."""
    start, stop, step = index.indices(w.weight.shape[-2])
    if step != 1 or start % w.block[0]:
        raise ValueError(f"FP8 outputs {start}:{stop}:{step} do not start on a block row of {w.block[0]}")
    rows = slice(start // w.block[0], -(-stop // w.block[0]))
    return FP8Weight(np.ascontiguousarray(w.weight[..., start:stop, :]), np.ascontiguousarray(w.scale[..., rows, :]),
                     w.block)
