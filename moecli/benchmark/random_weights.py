"""Random weights for `moe bench`'s named shapes, tensor by tensor, in the format the Hub stores them.

What: one (name, array) pair at a time for every tensor a Hub checkpoint of the config holds, so a
writer can stream them to safetensors shards without the model ever being in memory at once.
Float tensors are normal draws scaled by 1/sqrt(their last axis) (norm weights ones); a checkpoint
whose config.json says `quant_method: "mxfp4"` (gpt-oss) stores its expert stacks as openai/gpt-oss-*
does, `{name}_blocks` uint8 [e, out, in / 32, 16] and `{name}_scales` uint8 [e, out, in / 32]
(`moecli.checkpoints.mxfp4`): random E2M1 codes, and E8M0 scales chosen so the weights' RMS is about
1/sqrt(in), as a trained layer's is (the rest bfloat16 / float32, as config.json's dtype says).
Random bytes are much cheaper to draw than normals, and no float copy of the experts is ever made.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from moecli.checkpoints.export import export_names
from moecli.checkpoints.families import checkpoint_tensors
from moecli.model import mxfp4, quant
from moecli.model.config import ModelConfig

#: The RMS of an E2M1 value whose code is uniform over all 16.
E2M1_RMS = float(np.sqrt(np.mean(mxfp4.FP4_VALUES ** 2)))
CHUNK = 1 << 24  # values drawn at a time: a large tensor's float32 temporaries stay 64 MiB


def checkpoint_names(config: ModelConfig) -> list[str]:
    """One name per tensor, as a Hub checkpoint writes them: `export_names`' choice among the table's
    alternatives, plus the fused tensors (gpt-oss's gate_up_proj) that fill parameters no other name
    does: the first the table offers for them (Granite's Hub `input_linear`, not transformers 5's
    `experts.gate_up_proj`)."""
    names = export_names(config)
    claimed = {(module, param) for module, param, _, _ in names.values()}
    fused = []
    for name, spec in checkpoint_tensors(config).items():
        parts = {(t.module, t.param) for t in spec.targets}
        if len(spec.targets) > 1 and not parts & claimed:
            fused.append(name)
            claimed |= parts
    return list(names) + fused


def normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float, dtype) -> np.ndarray:
    """N(0, scale^2) values of `shape` in `dtype`, drawn CHUNK at a time (the same stream as one draw)."""
    out = np.empty(math.prod(shape), dtype)
    for start in range(0, out.size, CHUNK):
        stop = min(start + CHUNK, out.size)
        out[start:stop] = rng.standard_normal(stop - start, dtype=np.float32) * scale
    return out.reshape(shape)


def random_mxfp4(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(blocks [..., out, in / 32, 16], scales [..., out, in / 32]) for a float stack of `shape`
    [..., in, out]: uniform codes, block exponents within one of 2^round(log2(in^-1/2 / E2M1_RMS))."""
    blocks_shape, scales_shape = mxfp4.packed_shapes(shape)
    exponent = round(math.log2(shape[-2] ** -0.5 / E2M1_RMS)) + mxfp4.SCALE_BIAS
    blocks = rng.integers(0, 256, blocks_shape, dtype=np.uint8).reshape(*scales_shape, mxfp4.BLOCK // 2)
    return blocks, rng.integers(exponent - 1, exponent + 2, scales_shape, dtype=np.uint8)


def random_tensors(config: ModelConfig, dtype, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of the checkpoint, one at a time; floats in `dtype`, experts in
    MXFP4 (`{name}_blocks`, `{name}_scales`) when `config.quant` says the checkpoint packs them."""
    table = checkpoint_tensors(config)
    rng = np.random.default_rng(seed)
    for name in checkpoint_names(config):
        spec = table[name]
        if all(quant.is_mxfp4(f"{t.module}/{t.param}", config.quant) for t in spec.targets):
            blocks, scales = random_mxfp4(rng, spec.shape)
            yield name + mxfp4.SUFFIXES[0], blocks
            yield name + mxfp4.SUFFIXES[1], scales
        elif name.endswith("norm.weight") or "layernorm" in name:
            yield name, np.ones(spec.shape, dtype)
        else:
            yield name, normal(rng, spec.shape, spec.shape[-1] ** -0.5, dtype)
