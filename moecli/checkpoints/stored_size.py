"""The bytes a checkpoint's weights take in the format it stores them in, from config.json alone.

What `moe info` and `moe download` report before a tensor is read: the parameters come from the
model's traced shapes (`moecli.model.sizes`), their storage from config.json's `dtype` (`torch_dtype`
before transformers 5; bfloat16 if it names none) and `quantization_config`:
    float:              every parameter in the dtype;
    block-FP8:          each Linear weight (attention, dense MLPs, each expert; not the routers, the
                        LM head or what `modules_to_not_convert` / `ignored_layers` names, matched as
                        transformers matches them) 1 byte a weight + a float32 scale per block of the
                        torch-style [out, in] matrix, ceil(out / bo) x ceil(in / bi) of them;
    MXFP4 (gpt-oss):    the experts 4 bits a weight (blocks) + one E8M0 byte per 32 (scales);
    compressed-tensors: the Linears of the kinds the checkpoint quantizes (`QuantConfig`) as int32 words
                        of 32 / bits values a row (pack-quantized; naive: int8 [out, in]) + scales
                        [out, groups] in the dtype (+ zero points when asymmetric; + the int64 [2]
                        `weight_shape` of a packed one);
everything else (embeddings, norms, biases, routers) in the dtype. Exact for the layouts these
formats define, up to what config.json cannot say: tensors a checkpoint keeps in another float
dtype (DeepSeek-V3's float32 selection bias) and what the loader skips (multi-token-prediction layers).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from moecli.checkpoints import compressed_tensors as ct
from moecli.checkpoints import fp8, mxfp4
from moecli.checkpoints.families import checkpoint_tensors
from moecli.dtypes import FLOATS
from moecli.hub.progress import human_bytes
from moecli.model import quant
from moecli.model.config import ModelConfig, QuantConfig
from moecli.model.mxfp4 import BLOCK as MXFP4_BLOCK
from moecli.model.sizes import parameter_shapes

FP8_SCALE_BYTES = 4  # float32 `weight_scale_inv`, as DeepSeek, Qwen and MiniMax store them


@dataclass(frozen=True)
class StoredWeights:
    """The weights' bytes by what holds them: {"bfloat16": ..., "float8_e4m3fn": ..., ...}."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        """'12.8 GiB (MXFP4 blocks 8.9 GiB + E8M0 scales 570.3 MiB + bfloat16 3.3 GiB)'; one part: '3.1 GiB'."""
        shown = [f"{name} {human_bytes(n)}" for name, n in self.parts.items() if n]
        return human_bytes(self.total) + (f" ({' + '.join(shown)})" if len(shown) > 1 else "")


def float_dtype(hf: dict) -> str:
    """The float dtype config.json stores the weights in (bfloat16 when it says none moecli knows)."""
    name = hf.get("dtype") or hf.get("torch_dtype")
    return name if name in FLOATS else "bfloat16"


def stored_weights(config: ModelConfig, hf: dict) -> StoredWeights:
    """The bytes of the checkpoint whose config.json is `hf` and whose `ModelConfig` is `config`
    (`load_config`'s: its `quant` says which kinds a compressed-tensors checkpoint quantizes)."""
    dtype = float_dtype(hf)
    itemsize = FLOATS[dtype].itemsize
    block, scheme = fp8.parse_config(hf), ct.parse_config(hf)
    packed_mxfp4 = mxfp4.parse_config(hf)
    keep_float = _not_converted(config, hf) if block else set()
    parts: dict[str, int] = {}
    for module, group in parameter_shapes(config.replace(quant=QuantConfig())).items():
        for param, s in group.items():
            path, n = f"{module}/{param}", math.prod(s.shape)
            if packed_mxfp4 and quant.kind_for(path) == "experts":
                stored = {"MXFP4 blocks": n // 2, "E8M0 scales": n // MXFP4_BLOCK}
            elif block and _is_linear(module, param) and path not in keep_float:
                *lead, d_in, d_out = s.shape
                grid = math.prod(fp8.grid((*lead, d_out, d_in), block.block))
                stored = {"float8_e4m3fn": n, "float32 block scales": grid * FP8_SCALE_BYTES}
            elif scheme and quant.bits_for(path, config.quant):
                stored = _compressed(s.shape, scheme, itemsize, dtype)
            else:
                stored = {dtype: n * itemsize}
            for name, nbytes in stored.items():
                parts[name] = parts.get(name, 0) + nbytes
    return StoredWeights(parts)


def _is_linear(module: str, param: str) -> bool:
    """A Linear layer's weight (a torch nn.Linear in the checkpoint) or a stack of the experts' ones."""
    return param == "w" or quant.kind_for(f"{module}/{param}") == "experts"


def _not_converted(config: ModelConfig, hf: dict) -> set[str]:
    """"module/param" of the Linears a block-FP8 checkpoint keeps in float: the LM head, and those
    `modules_to_not_convert` (MiniMax: `ignored_layers`) names, matched against their checkpoint names
    as transformers' `should_convert_module` does (from the start up to a module boundary, as a regex
    likewise, or as a suffix). An expert stack goes by its first expert's name."""
    qc = hf.get("quantization_config") or {}
    patterns = [p for p in (qc.get("modules_to_not_convert") or qc.get("ignored_layers") or [])
                if isinstance(p, str)]
    names: dict[str, str] = {}
    for name, spec in checkpoint_tensors(config).items():
        if name.endswith(".weight"):
            target = spec.targets[0]
            names.setdefault(f"{target.module}/{target.param}", name.removesuffix(".weight"))
    return {"transformer/lm_head"} | {path for path, name in names.items()
                                      if any(_matches(name, p) for p in patterns)}


def _matches(name: str, pattern: str) -> bool:
    try:
        if re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", name):
            return True
    except re.error:
        pass
    return name.endswith(pattern)


def _compressed(shape: tuple[int, ...], scheme: ct.Scheme, itemsize: int, dtype: str) -> dict[str, int]:
    """One compressed-tensors Linear (or a stack of them, one per expert) of moecli's [..., in, out]."""
    *lead, d_in, d_out = shape
    count = math.prod(lead)
    groups = 1 if scheme.group_size is None else -(-d_in // scheme.group_size)

    def words(rows: int, cols: int) -> int:  # bytes of int32 words holding `cols` values a row
        return rows * -(-cols * scheme.bits // 32) * 4

    if scheme.format == ct.PACKED:  # + weight_shape, int64 [2]; zero points packed down the outputs
        values, extra = words(d_out, d_in) + 16, 0 if scheme.symmetric else words(groups, d_out)
    else:
        values, extra = d_out * d_in, 0 if scheme.symmetric else d_out * groups
    return {f"int{scheme.bits} weights": count * values, f"{dtype} scales": count * d_out * groups * itemsize,
            "zero points": count * extra}

