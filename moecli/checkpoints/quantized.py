"""Reading a quantized checkpoint's tensors into moecli's layout, as they stream from the files.

A compressed-tensors checkpoint (`moecli.checkpoints.compressed_tensors`) stores each quantized
Linear `prefix` as several tensors (`prefix.weight_packed`, `.weight_scale`, `.weight_shape`, ...)
where a float checkpoint has `prefix.weight`. `combine` gathers them as they arrive and yields
`prefix.weight` once, as a `Packed` matrix in moecli's own layout (`moecli.model.quant`: [in, out],
int8 or two 4-bit values a byte, float16 scales per group) — the integers kept exactly, no
dequantize-requantize round trip — or as a float matrix where moecli's layout cannot take it
(asymmetric or per-channel schemes; the placer then quantizes it again in groups of 32).
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from moecli.checkpoints import compressed_tensors as ct
from moecli.checkpoints.safetensors import check_safetensors, safetensors_files
from moecli.errors import CheckpointError
from moecli.model import quant
from moecli.model.config import QuantConfig

PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


class Packed(NamedTuple):
    """A quantized matrix in moecli's layout, oriented [in, out] (already transposed)."""

    q: np.ndarray       # int8 [in, out] or uint8 [in / 2, out]
    scale: np.ndarray   # float16 [in / group, out]

    @property
    def bits(self) -> int:
        return 8 if self.q.dtype == np.int8 else 4

    @property
    def shape(self) -> tuple[int, int]:
        """The matrix's shape as the checkpoint names it, torch's [out, in]."""
        return self.q.shape[-1], self.q.shape[-2] * (2 if self.bits == 4 else 1)

    @property
    def group(self) -> int:
        return self.shape[1] // self.scale.shape[-2]


def quant_config_for(config, table, scheme: ct.Scheme, folder=None) -> QuantConfig:
    """The QuantConfig of a checkpoint quantized with `scheme`: each kind of weight (experts, dense,
    LM head) at the scheme's bits if the checkpoint quantizes its Linears, else float, so moecli
    computes what the checkpoint holds. Groups stay the checkpoint's where moecli's layout takes
    them (symmetric, a power of two), else 32 (those weights are dequantized and quantized again).

    Which Linears are quantized: with the checkpoint's `folder`, those whose scales it stores. The
    names alone (`ct.is_quantized`) can say otherwise: the library matches its targets against the
    modules in memory, and transformers 5 holds an MoE's experts as fused parameters, not Linears,
    so the library leaves them float though "Linear" matches their names in the checkpoint."""
    stored = stored_names(folder) if folder is not None else None
    kinds: dict[str, bool] = {}
    for name, spec in table.items():
        target = spec.targets[0]
        if name.endswith(".weight") and len(spec.shape) == 2 and target.transpose and len(spec.targets) == 1:
            prefix = name.removesuffix(".weight")
            quantized = f"{prefix}.weight_scale" in stored if stored is not None else ct.is_quantized(prefix, scheme)
            for pattern, kind in quant.RULES:
                if re.search(pattern, f"{target.module}/{target.param}"):
                    kinds[kind] = kinds.get(kind, False) or quantized
    direct = scheme.symmetric and scheme.group_size and scheme.group_size & (scheme.group_size - 1) == 0
    return QuantConfig(**{kind: scheme.bits if kinds.get(kind) else 0 for kind in ("experts", "dense", "lm_head")},
                       group=scheme.group_size if direct else quant.GROUP)


def stored_names(folder) -> set[str] | None:
    """The names of the tensors in the checkpoint `folder`, from its files' headers; None where they
    cannot be read (no weights yet, a truncated file: the loader says so when it gets there)."""
    try:
        return {name for path in safetensors_files(folder) for name in check_safetensors(path)[0]}
    except CheckpointError:
        return None


def _needed(scheme: ct.Scheme) -> set[str]:
    names = {"weight_scale"} | ({"weight_packed", "weight_shape"} if scheme.format == ct.PACKED else {"weight"})
    return names | (set() if scheme.symmetric else {"weight_zero_point"})


def combine(stream: Iterator[tuple[str, np.ndarray]], scheme: ct.Scheme) -> Iterator[tuple[str, np.ndarray]]:
    """The stream with each quantized Linear's parts replaced by one `prefix.weight`: a `Packed`
    (symmetric, group sizes a power of two) or a float32 [out, in] matrix."""
    pending: dict[str, dict[str, np.ndarray]] = {}
    for name, tensor in stream:
        prefix, _, suffix = name.rpartition(".")
        quantized_part = suffix in PARTS or (suffix == "weight" and tensor.dtype.kind in "iu")
        if not quantized_part:
            yield name, tensor
            continue
        parts = pending.setdefault(prefix, {})
        parts[name] = tensor
        if {n.rpartition(".")[2] for n in parts} >= _needed(scheme):
            del pending[prefix]
            yield f"{prefix}.weight", _convert(parts, prefix, scheme)
    if pending:  # a quantized Linear missing a part: the loader names the weight as missing
        return


def _convert(parts: dict[str, np.ndarray], prefix: str, scheme: ct.Scheme):
    values, scales, zero_points = ct.decode(parts, prefix, scheme)          # [out, in], [out, groups]
    group = values.shape[1] // scales.shape[1]
    if zero_points is None and group >= 2 and group & (group - 1) == 0:
        return Packed(quant.pack(np.ascontiguousarray(values.T), scheme.bits), scales.T.astype(np.float16))
    return ct.dequantize(values, scales, zero_points)
