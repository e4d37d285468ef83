"""`moe quantize`: a float checkpoint rewritten as a compressed-tensors checkpoint (W8A16 / W4A16).

The weights `--quantize q{bits}` would quantize at those bits (`moecli.model.quant.RULES`: every
expert and dense Linear of the decoder; the LM head too at 8 bits) are quantized in groups of 32 along the input dimension, symmetric, the way the
compressed-tensors library itself does (`compressed_tensors.quantize`), so vLLM, transformers and
moecli read the result; everything else (embeddings, norms, routers, the LM head) is copied as it
is and named in the config's `ignore` list. One tensor is read, quantized and kept at a time:
the peak is the quantized output plus one float tensor. A later `moe chat --model DST` loads the
integers as they are (no quantize step, and 1/4 or 1/2 of the bytes to read).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from moecli.checkpoints import compressed_tensors as ct
from moecli.checkpoints.families import checkpoint_tensors, load_config, read_config_json
from moecli.checkpoints.safetensors import iter_tensors, safetensors_files
from moecli.dtypes import FLOATS
from moecli.errors import UsageError
from moecli.hub.download import INFERENCE_FILES
from moecli.model import quant
from moecli.model.config import QuantConfig

SHARD_BYTES = 2 * 2**30  # output shards of at most ~2 GiB, listed in model.safetensors.index.json


def quantize_checkpoint(src: str | Path, dst: str | Path, bits: int, group: int = quant.GROUP) -> Path:
    """Write `src` (a float checkpoint folder) as a compressed-tensors checkpoint of `bits` into `dst`."""
    src, dst = Path(src), Path(dst)
    check_target(dst, bits)
    hf = read_config_json(src)
    if hf.get("quantization_config"):
        raise UsageError(f"{src} is quantized already", "quantize a float16/bfloat16/float32 checkpoint")
    config = load_config(src)
    table = checkpoint_tensors(config)
    scheme = ct.Scheme(bits=bits, group_size=group)
    shards, current, size, ignore = [], {}, 0, []
    for name, tensor in iter_tensors(safetensors_files(src)):
        prefix = name.removesuffix(".weight")
        spec = table.get(name)
        target = spec.targets[0] if spec and len(spec.targets) == 1 else None
        covered = (target is not None and tensor.ndim == 2 and name.endswith(".weight") and target.transpose
                   and quant.bits_for(f"{target.module}/{target.param}", QuantConfig.preset(bits)) == bits
                   and tensor.shape[1] % group == 0)
        if covered:
            parts = {f"{prefix}.{suffix}": array for suffix, array in _quantized(tensor, scheme).items()}
        else:
            parts = {name: tensor}
            if tensor.ndim == 2 and name.endswith(".weight") and "embed_tokens" not in name:
                ignore.append(prefix)  # a Linear left in float (router, LM head, ...): the library must skip it
        for key, array in parts.items():
            if size and size + array.nbytes > SHARD_BYTES:
                shards.append(current)
                current, size = {}, 0
            current[key], size = np.ascontiguousarray(array), size + array.nbytes
    shards.append(current)
    dst.mkdir(parents=True, exist_ok=True)
    _write_shards(dst, shards)
    hf["quantization_config"] = ct.config_for(scheme, sorted(set(ignore)))
    (dst / "config.json").write_text(json.dumps(hf, indent=2) + "\n", encoding="utf-8")
    for path in src.iterdir():  # tokenizer, chat template, generation config, model card
        if path.is_file() and not path.name.endswith(".safetensors") and path.name not in (
                "config.json", "model.safetensors.index.json") and _wanted(path.name):
            shutil.copy2(path, dst / path.name)
    return dst


def check_target(dst: Path, bits: int) -> None:
    """The UsageErrors of the arguments alone (bits, a non-empty `dst`), before a source is read or downloaded."""
    if bits not in (4, 8):
        raise UsageError(f"--bits must be 4 or 8, got {bits}", "pass --bits 4 (W4A16) or --bits 8 (W8A16)")
    if Path(dst).exists() and (not Path(dst).is_dir() or any(Path(dst).iterdir())):
        raise UsageError(f"{dst} exists and is not an empty folder", "choose a new --out folder")


def _quantized(w: np.ndarray, scheme: ct.Scheme) -> dict[str, np.ndarray]:
    """One Linear's stored tensors, by suffix. Scales are stored in w's own dtype, as the library
    does: transformers dequantizes fused MoE experts in the scales' dtype, so float16 scales would
    make a float32 model's experts float16. A float32 w is quantized as the library quantizes a
    float16 model, so every scale is a float16 value and moecli's float16 scales hold it exactly."""
    values, scales, zero = ct.quantize(w.astype(np.float16) if w.dtype == np.float32 else w,
                                       scheme.bits, scheme.group_size, scheme.symmetric)
    name = next(name for name, dtype in FLOATS.items() if dtype == w.dtype)
    return ct.encode(values, scales, zero, replace(scheme, scale_dtype=name))


def _wanted(name: str) -> bool:
    from fnmatch import fnmatch

    return any(fnmatch(name, pattern) for pattern in INFERENCE_FILES["allow_patterns"]) or name == "README.md"


def _write_shards(dst: Path, shards: list[dict[str, np.ndarray]]) -> None:
    if len(shards) == 1:
        save_file(shards[0], str(dst / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(a.nbytes for a in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
