"""Reading MXFP4 checkpoints (gpt-oss: `quantization_config.quant_method: "mxfp4"`) with the experts kept packed.

The format is `moecli.model.mxfp4`'s. Where a float checkpoint stores an expert stack `prefix`
(transformers' `experts.gate_up_proj` [e, in, out] and `experts.down_proj`), an MXFP4 one stores
    prefix_blocks  uint8 [e, out, in / 32, 16]: 32 E2M1 codes a block, two a byte, low nibble first
    prefix_scales  uint8 [e, out, in / 32]:     the blocks' E8M0 exponents, 2^(s - 127)
(transformers' `integrations/mxfp4.py`, `convert_moe_packed_tensors`, dequantizes them into the
float tensor; biases, attention, router and embeddings stay float: `modules_to_not_convert`).
`combine` pairs the two as they stream from the files and yields `prefix` once, as a
`PackedMXFP4` that stands in for the float tensor (its `shape` is the float tensor's), so a
family's tensor table needs no entry of its own for them; `select` takes a target's part of it
(gpt-oss's gate and up are the even and odd outputs of gate_up) as whole rows of bytes. No float
copy is made unless the experts are asked for in another format (`--quantize`, which dequantizes
one stack at a time in `moecli.checkpoints.placement`).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from moecli.errors import CheckpointError, ConfigError
from moecli.model import mxfp4
from moecli.model.mxfp4 import MXFP4Weight

QUANT_METHOD = "mxfp4"
#: The safetensors codes an MXFP4 checkpoint adds to the floats (`safetensors.iter_tensors`).
STORED = {"U8": np.dtype(np.uint8)}
#: transformers' MXFP4 integration replaces only gpt-oss's experts (`replace_with_mxfp4_linear`).
FAMILIES = ("gpt_oss",)


def parse_config(hf: dict) -> bool:
    """Whether config.json says the checkpoint's experts are MXFP4; a ConfigError for a family whose
    MXFP4 checkpoints transformers does not define."""
    qc = hf.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return False
    if hf.get("model_type") not in FAMILIES:
        raise ConfigError(f"MXFP4 checkpoints of {hf.get('model_type')!r} models are not supported",
                          f"moecli reads MXFP4 experts of {', '.join(FAMILIES)} checkpoints")
    return True


class PackedMXFP4(NamedTuple):
    """A checkpoint's MXFP4 expert stack, standing for transformers' float tensor [e, in, out]."""

    blocks: np.ndarray   # uint8 [e, out, in / 2]
    scales: np.ndarray   # uint8 [e, out, in / 32]

    @property
    def shape(self) -> tuple[int, ...]:
        return MXFP4Weight(self.blocks, self.scales).logical_shape

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)


def _pair(prefix: str, blocks: np.ndarray, scales: np.ndarray) -> PackedMXFP4:
    """The two stored tensors of `prefix` as a PackedMXFP4, their dtypes and shapes checked."""
    if (blocks.dtype != np.uint8 or scales.dtype != np.uint8 or blocks.ndim < 3 or blocks.shape[-1] != 16
            or blocks.shape[:-1] != scales.shape):
        raise CheckpointError(f"MXFP4 tensors {prefix}_blocks {blocks.dtype} {list(blocks.shape)} and {prefix}_scales "
                              f"{scales.dtype} {list(scales.shape)} do not fit together (uint8 [..., out, blocks, 16] "
                              "and uint8 [..., out, blocks])", "the checkpoint is corrupt; re-download it")
    return PackedMXFP4(blocks.reshape(*blocks.shape[:-2], -1), scales)


def combine(stream: Iterator[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray | PackedMXFP4]]:
    """The stream with each `prefix_blocks` / `prefix_scales` pair replaced by one `prefix`, a
    PackedMXFP4, yielded when the second of the two arrives. A pair missing a part yields nothing:
    the loader then names the weight as missing."""
    pending: dict[str, dict[str, np.ndarray]] = {}
    for name, tensor in stream:
        suffix = next((s for s in mxfp4.SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            yield name, tensor
            continue
        prefix = name.removesuffix(suffix)
        parts = pending.setdefault(prefix, {})
        parts[suffix] = tensor
        if len(parts) == 2:
            del pending[prefix]
            yield prefix, _pair(prefix, *(parts[s] for s in mxfp4.SUFFIXES))


def select(packed: PackedMXFP4, target) -> MXFP4Weight:
    """Target `target`'s part of the stack (a `families.common.Target`: a slice and stride of the
    out axis, or all of it; optionally one expert), as numpy arrays in `moecli.model.mxfp4`'s layout."""
    if target.transpose:
        raise CheckpointError(f"{target.module}/{target.param}: MXFP4 tensors stand for [in, out] stacks, "
                              "which are not transposed", "the family's tensor table is wrong for MXFP4")
    w = MXFP4Weight(packed.blocks, packed.scales)
    if target.rows is not None:
        w = mxfp4.select_outputs(w, slice(target.rows[0], target.rows[1], target.stride))
    return w if target.expert is None else mxfp4.take(w, target.expert)


def dequantize(w: MXFP4Weight) -> np.ndarray:
    """The float32 matrix [..., in, out] of numpy MXFP4 arrays, one leading index at a time (a
    stack's temporaries stay one matrix's size): the fallback when MXFP4 experts are asked for
    as float or integers."""
    *lead, d_in, d_out = w.logical_shape
    out = np.empty((*lead, d_in, d_out), np.float32)
    for index in np.ndindex(*lead):
        codes = np.stack([w.blocks[index] & 15, w.blocks[index] >> 4], axis=-1).reshape(d_out, -1, mxfp4.BLOCK)
        with np.errstate(over="ignore"):  # s = 254 and 255 overflow to inf, as transformers' ldexp does
            values = np.ldexp(mxfp4.FP4_VALUES[codes], w.scales[index].astype(np.int32)[..., None] - mxfp4.SCALE_BIAS)
        out[index] = values.reshape(d_out, d_in).T
    return out
