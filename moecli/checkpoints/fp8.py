"""Block-FP8 checkpoints (`quant_method: "fp8"` with `weight_block_size`): experts kept packed, the rest dequantized.

What: the format DeepSeek-V3/R1, Kimi-K2, MiniMax-M2 and the Qwen3 "-FP8" releases ship (transformers'
`FineGrainedFP8Config`). Each quantized Linear `prefix` stores, torch-style [out, in]:
    prefix.weight            float8_e4m3fn [out, in]                        (safetensors F8_E4M3)
    prefix.weight_scale_inv  float32 [ceil(out / bo), ceil(in / bi)]        (bfloat16 and e8m0 read too)
with (bo, bi) = `weight_block_size`, usually [128, 128]: the weight is
    w[i, j] = weight[i, j] * weight_scale_inv[i // bo, j // bi]
(despite its name the stored factor multiplies: it is the inverse of the scale the quantizer divided by,
amax / 448 per block). Where out or in is not a multiple of the block the last block row or column is
partial (DeepSeek-V3's kv_a_proj_with_mqa: 576 rows, 5 block rows). transformers 5's fused expert stacks
(`experts.gate_up_proj` [e, 2f, d], `experts.down_proj` [e, d, f]) carry one grid per expert under the
weight's name + "_scale_inv" ([e, ceil(2f / bo), ceil(d / bi)]): the blocks tile the fused matrix, so a
block may straddle the gate and up halves. Which Linears are quantized is what the files store: the
config's `modules_to_not_convert` (MiniMax: `ignored_layers`) lists the rest (routers, norms,
embeddings, the LM head, ...), and moecli, like transformers' dequantizing loader, goes by each
tensor's dtype and scale instead of the list.

Why blocks: e4m3 keeps 3 mantissa bits and a range of +-448, so a tensor needs scales that follow its
local magnitude; a 128x128 tile (one per 128 inputs *and* 128 outputs) lets an FP8 GEMM apply them tile
by tile while one outlier costs resolution in its own tile only (DeepSeek-V3 technical report, Liu et al.
2024, section 3.3 "fine-grained quantization").

How moecli reads it: the routed experts (most of the bytes) stay packed, their e4m3 bytes and
float32 scales as stored (`moecli.model.fp8`, `QuantConfig.experts_format` "fp8", chosen by
`keeps_experts_packed`): `read` yields each as a `PackedFP8`, the memory check counts 1 byte a weight
plus the scales, and on CPU the kernel csrc/fp8.cc multiplies the bytes in place (other backends
dequantize in the graph, `moecli.model.quant.dense`). Every other FP8 tensor (attention, dense MLPs,
shared experts), and the experts too under `--quantize q8|q4` or where `keeps_experts_packed` says no
(d_expert not a whole number of block rows: a fused gate_up stack's halves would share block rows), is
dequantized into the model's dtype as it streams from the files (products in float32, rounded once, as
transformers' `Fp8Dequantize` does), a block row at a time; `--quantize` then works from these floats
(moving each block into the int8 layout of `moecli.model.quant` directly would round a second time).
The scales' shapes are checked from the headers before any tensor is read.

transformers 5.24 differs where a dimension is not a multiple of the block: its CPU dequantizing loader
(`FineGrainedFP8Config(dequantize=True)`, which the default becomes without a GPU) takes the block as
rows // grid rows, so it raises (576 rows, 5 block rows) or silently tiles differently (24 rows, 2 block
rows of 16: blocks of 12). moecli follows the config's block size, as the FP8 GEMMs do (transformers'
triton kernel, DeepSeek's `weight_dequant`); wherever the dimensions are multiples both agree exactly.

Refused with a ConfigError: per-tensor FP8 (no weight_block_size), static activation scales, e5m2
weights, and DeepSeek-V4's FP4 experts (`expert_dtype: "fp4"`).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from moecli.checkpoints.placement import aligned_empty
from moecli.checkpoints.safetensors import check_safetensors, iter_tensors, safetensors_files
from moecli.dtypes import SAFETENSORS_NAMES
from moecli.errors import CheckpointError, ConfigError
from moecli.model import fp8 as packed_fp8
from moecli.model.fp8 import FP8Weight

QUANT_METHOD = "fp8"
SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv", "x.experts.down_proj" -> "..._scale_inv"
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
#: The safetensors codes an FP8 checkpoint adds to the floats: the weights, and e8m0 (power-of-two) scales.
STORED = {"F8_E4M3": E4M3, "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu)}
SCALE_CODES = ("F32", "BF16", "F16", "F8_E8M0")
#: Every e4m3fn code (a byte) as float32, exactly: 256 entries, NaN at 0x7f and 0xff (no infinities).
E4M3_VALUES = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)
HINT = "moecli reads block-FP8 checkpoints (e4m3 weights, a scale per block, dynamic activations)"
DAMAGED = "the checkpoint is incomplete or damaged; re-download it"


@dataclass(frozen=True)
class Scheme:
    """A block-FP8 checkpoint's layout: `block` = (rows, columns) of the torch-style [out, in] weight
    one scale covers (config.json's weight_block_size)."""

    block: tuple[int, int]

    def label(self) -> str:
        return f"block-FP8 {self.block[0]}x{self.block[1]}"


def parse_config(hf_config: dict) -> Scheme | None:
    """The Scheme of config.json's `quantization_config` with quant_method "fp8", None for any other
    (or none); a ConfigError for an FP8 variant moecli cannot read."""
    qc = hf_config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return None
    block = qc.get("weight_block_size")
    if block is None:
        raise ConfigError("per-tensor FP8 checkpoints (no weight_block_size) are not supported", HINT)
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise ConfigError(f"FP8 quantization_config weight_block_size must be two positive integers, got "
                          f"{str(block)[:40]}", "the checkpoint's config.json is malformed")
    for key, allowed, what in (("activation_scheme", ("dynamic",), "static activation scales"),
                               # fmt: DeepSeek and Qwen write "e4m3", MiniMax-M2 "float8_e4m3fn"
                               ("fmt", ("e4m3", "e4m3fn", "float8_e4m3fn"), "float8 weights other than e4m3"),
                               ("expert_dtype", ("fp8",), "FP4 experts")):
        value = qc.get(key) or allowed[0]
        if str(value).lower() not in allowed:
            raise ConfigError(f"FP8 checkpoints with {what} ({key} {str(value)[:20]!r}) are not supported", HINT)
    return Scheme((block[0], block[1]))


def grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The scale tensor's shape for a weight of `shape` [..., rows, cols]: one scale per block, ceil."""
    *lead, rows, cols = shape
    return (*lead, *packed_fp8.grid(rows, cols, block))


def check_headers(headers: dict[str, dict], scheme: Scheme) -> None:
    """CheckpointError for the first FP8 weight without its scale (or with a misshapen one), or a scale
    without its FP8 weight, in the checkpoint's merged safetensors headers {name: info}: found before a
    single tensor is read."""
    bo, bi = scheme.block
    for name, info in headers.items():
        if info.get("dtype") == "F8_E4M3":
            scale, shape = headers.get(name + SCALE_SUFFIX), _shape(info)
            if scale is None:
                raise CheckpointError(f"FP8 tensor {name} has no scale {name + SCALE_SUFFIX} in the checkpoint",
                                      DAMAGED)
            if shape is None or len(shape) < 2:
                raise CheckpointError(f"FP8 tensor {name} has shape {str(info.get('shape'))[:40]}, not a matrix "
                                      "or a stack of them", DAMAGED)
            expected = grid(shape, scheme.block)
            if _shape(scale) != expected or scale.get("dtype") not in SCALE_CODES:
                stored = SAFETENSORS_NAMES.get(scale.get("dtype"), "?")
                raise CheckpointError(f"{name + SCALE_SUFFIX} is {stored} {str(scale.get('shape'))[:40]}, expected "
                                      f"float32 {list(expected)}: one scale per {bo}x{bi} block of {name} "
                                      f"{list(shape)}", "the checkpoint does not match its quantization_config's "
                                      "weight_block_size; re-download it")
        elif name.endswith(SCALE_SUFFIX) and headers.get(name.removesuffix(SCALE_SUFFIX), {}).get("dtype") != "F8_E4M3":
            raise CheckpointError(f"scale {name} belongs to no float8_e4m3fn tensor "
                                  f"{name.removesuffix(SCALE_SUFFIX)} in the checkpoint", DAMAGED)


def _shape(info: dict) -> tuple[int, ...] | None:
    shape = info.get("shape")
    ok = isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)
    return tuple(shape) if ok else None


def merged_headers(files: list[Path]) -> dict[str, dict]:
    """{tensor name: header entry} over all the checkpoint's files (checked complete and well formed)."""
    return {name: info for path in files for name, info in check_safetensors(path)[0].items()
            if name != "__metadata__"}


def dequantize(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], dtype=np.float32) -> np.ndarray:
    """weight float8_e4m3fn [..., rows, cols] times its scales [..., ceil(rows / bo), ceil(cols / bi)] (see
    the module doc), as a 64-byte aligned array of `dtype`: products in float32, one block row at a time
    (so no float32 copy of a whole tensor), rounded once into `dtype`. Block rows go to a thread per core
    (numpy releases the GIL in the table look-up and the products): ~150 M weights/s on one core."""
    *lead, rows, cols = weight.shape
    expected = grid(weight.shape, block)
    if weight.dtype != E4M3 or tuple(scale_inv.shape) != expected:
        raise ValueError(f"need float8_e4m3fn weights and scales of shape {list(expected)}, got {weight.dtype}, "
                         f"{list(scale_inv.shape)}")
    out = aligned_empty(weight.shape, dtype)
    codes = weight.reshape(-1, rows, cols).view(np.uint8)                   # [stack, rows, cols]
    scales = np.asarray(scale_inv, np.float32).reshape(-1, *expected[-2:])  # [stack, row blocks, col blocks]
    flat = out.reshape(-1, rows, cols)

    def block_row(task: tuple[int, int]) -> None:
        s, b = task
        r = slice(b * block[0], (b + 1) * block[0])
        flat[s, r] = E4M3_VALUES[codes[s, r]] * np.repeat(scales[s, b], block[1])[:cols]  # [bo, cols]

    tasks = [(s, b) for s in range(codes.shape[0]) for b in range(expected[-2])]
    if len(tasks) > 1 and weight.size >= PARALLEL_MIN:
        list(_pool().map(block_row, tasks))
    else:
        for task in tasks:
            block_row(task)
    return out


PARALLEL_MIN = 1 << 20  # weights; smaller tensors are not worth handing to threads


@functools.cache
def _pool() -> ThreadPoolExecutor:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ThreadPoolExecutor(max(1, cores), thread_name_prefix="moecli-fp8")


class PackedFP8(NamedTuple):
    """A checkpoint's FP8 tensor kept packed, standing for its torch-style float tensor [..., out, in]."""

    weight: np.ndarray   # uint8 [..., out, in]: the e4m3 codes
    scale: np.ndarray    # float32 [..., ceil(out / bo), ceil(in / bi)]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def dtype(self) -> np.dtype:
        return E4M3


def keeps_experts_packed(config, scheme: Scheme, folder: Path | None = None) -> bool:
    """Whether a block-FP8 checkpoint's routed experts stay packed in memory (`moecli.model.fp8`,
    `QuantConfig.experts_format` "fp8") rather than being dequantized as they load: a model with routed
    experts whose size d_expert is a whole number of block rows (transformers' fused gate_up stack [e, 2f,
    d] then splits between two block rows; every FP8 release has d_expert a multiple of 128), and, given
    the `folder`, a checkpoint whose expert tensors are FP8 (not listed in modules_to_not_convert)."""
    if not (config.n_experts and any(config.moe_layers)) or config.d_expert % scheme.block[0]:
        return False
    if folder is None:
        return True
    headers = merged_headers(safetensors_files(folder))
    return any(".experts." in name and info.get("dtype") == "F8_E4M3" for name, info in headers.items())


def select(packed: PackedFP8, target, block: tuple[int, int]) -> FP8Weight:
    """Target `target`'s part of a packed tensor (a `families.common.Target`: all of it, or a block-aligned
    slice of its out axis: a fused gate_up stack's half), as numpy arrays in `moecli.model.fp8`'s layout."""
    w = FP8Weight(packed.weight, packed.scale, block)
    if not target.transpose or target.shape is not None:
        raise CheckpointError(f"{target.module}/{target.param}: FP8 tensors are torch-style [out, in] Linears",
                              "the family's tensor table is wrong for block-FP8")
    if target.rows is None:
        return w
    try:
        return packed_fp8.select_outputs(w, slice(target.rows[0], target.rows[1], target.stride))
    except ValueError as e:
        raise CheckpointError(f"{target.module}/{target.param}: {e}", "load it with --quantize q8 instead") from e


def read(files: list[Path], scheme: Scheme, dtype, skip: tuple[str, ...] = (),
         keep=None) -> Iterator[tuple[str, np.ndarray | PackedFP8]]:
    """(name, array) for every tensor of the checkpoint's `files`, one at a time: float tensors as
    `iter_tensors` gives them, each FP8 weight dequantized into `dtype` under its own name once its scale
    has arrived too (its scale is not yielded), or, where `keep(name)` says so, kept packed as a
    PackedFP8 (the scales widened to float32). Names starting with a `skip` prefix (tensors the loader
    drops: multi-token-prediction layers) are passed on as stored, scales too, without being dequantized."""
    check_headers(merged_headers(files), scheme)
    weights: dict[str, np.ndarray] = {}
    scales: dict[str, np.ndarray] = {}
    for name, tensor in iter_tensors(files, quantized=STORED):
        if name.startswith(skip):  # weights and scales alike, as stored (the loader counts what it skips)
            yield name, tensor
            continue
        if name.endswith(SCALE_SUFFIX):
            owner = name.removesuffix(SCALE_SUFFIX)
            scales[owner] = tensor
        elif tensor.dtype == E4M3:
            owner = name
            weights[owner] = tensor
        else:
            yield name, tensor
            continue
        if owner in weights and owner in scales:  # the pair may arrive in either order, or from two shards
            weight, scale = weights.pop(owner), scales.pop(owner)
            if keep is not None and keep(owner):
                yield owner, PackedFP8(weight.view(np.uint8), scale.astype(np.float32))
            else:
                yield owner, dequantize(weight, scale, scheme.block, dtype)
    if weights or scales:  # check_headers found both halves of every pair, so only a changed file gets here
        raise CheckpointError(f"FP8 tensor {next(iter(weights or scales))} lost its pair while loading", DAMAGED)

