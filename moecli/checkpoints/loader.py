"""Reading Hugging Face safetensors checkpoints into moecli's parameter tree, tensor by tensor.

A checkpoint folder holds `config.json` and either `model.safetensors` or several shards listed
by `model.safetensors.index.json`. Each tensor is read (bf16 included, through ml_dtypes, without
torch), checked against the shape its family's table expects, converted to the target dtype and
placed; per-expert tensors fill a stacked [n_experts, ...] buffer that goes to the device as soon
as its last expert arrives. Host memory never holds two copies of the model.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from moecli import env
from moecli.model import quant
from moecli.model.config import ModelConfig
from moecli.errors import QUANTIZED_HINT, CheckpointError, ResourceError
from moecli.model.sizes import parameter_shapes, weight_bytes
from moecli.checkpoints import compressed_tensors, fp8
from moecli.checkpoints import mxfp4 as mxfp4_checkpoint
from moecli.checkpoints.families import checkpoint_tensors, ignored_reason, ignored_tensors, read_config_json
from moecli.checkpoints.placement import Placer
from moecli.checkpoints.quantized import Packed, combine
from moecli.checkpoints.safetensors import FLOAT_DTYPES, IGNORED_SUFFIXES, iter_tensors, safetensors_files

class FreeMemory(NamedTuple):
    free: int           # bytes
    where: str          # "on cuda:0 (NVIDIA H100 80GB HBM3)", "in host memory"
    accelerator: bool   # False: the weights live in host memory (CPU backend)


def available_memory() -> FreeMemory | None:
    """Memory free for the weights: this process's first device's allocator limit minus what it holds
    (GPU, TPU), else the host's MemAvailable from /proc/meminfo (CPU backend on Linux); None where unknown."""
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        stats = {}
    if stats.get("bytes_limit"):
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return FreeMemory(free, f"on {device.platform}:{device.id} ({device.device_kind})", True)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return FreeMemory(int(line.split()[1]) * 1024, "in host memory", False)
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(config: ModelConfig, dtype, n_devices: int = 1) -> None:
    """ResourceError, before anything is loaded, when the weights cannot fit: parameter count x dtype size
    against `available_memory()`. Over `n_devices` accelerators each holds the replicated parameters plus
    1/n_devices of the experts (`moecli.model.sharding`). MOECLI_NO_MEMORY_CHECK=1 skips the check."""
    from moecli.hub.progress import human_bytes

    if env.switch("MOECLI_NO_MEMORY_CHECK"):
        return
    free = available_memory()
    if free is None:
        return
    dtype = np.dtype(dtype)
    replicated, experts = weight_bytes(config, dtype.itemsize)
    split = n_devices > 1 and free.accelerator  # CPU devices all share the host's memory
    needed = replicated + (-(-experts // n_devices) if split else experts)
    if needed <= free.free:
        return
    fixes = ["--dtype bfloat16 (half the memory of float32)"] if dtype.itemsize > 2 else []
    fixes += [f"--devices N (more than {n_devices}) to spread the experts over N devices"] if free.accelerator else []
    fixes += ["a smaller model" + ("" if free.accelerator else ", or free host memory")]
    who = f"each of {n_devices} devices needs" if split else "the weights need"
    stored = config.quant.label() if config.quant else dtype.name
    raise ResourceError(f"{who} {human_bytes(needed)} in {stored} but only {human_bytes(free.free)} is free "
                        f"{free.where}", "use " + ", or ".join(fixes) + " (MOECLI_NO_MEMORY_CHECK=1 skips this check)")


def load_params(folder: str | Path, config: ModelConfig, dtype, mesh=None, notes: list[str] | None = None) -> dict:
    """Read the checkpoint in `folder` into a Haiku parameter tree of `dtype` arrays, placed on
    the default device or, with a mesh, spread over its devices (`moecli.checkpoints.placement`).
    With `config.quant`, the weights it covers are quantized as they are read (or kept as a quantized
    checkpoint has them). What was knowingly left out (a family's `ignored_tensors`) is appended to
    `notes`, for `moe generate --verbose`."""
    check_memory(config, dtype, 1 if mesh is None else mesh.devices.size)
    table = checkpoint_tensors(config)
    shapes = parameter_shapes(config)
    placer = Placer(shapes, dtype, mesh, config.quant)

    hf = read_config_json(folder)
    scheme = compressed_tensors.parse_config(hf)
    skipped = ignored_tensors(config, hf)  # e.g. multi-token-prediction layers
    files, block_fp8 = safetensors_files(folder), fp8.parse_config(hf)
    if block_fp8 is not None:  # block-FP8: experts kept packed (`QuantConfig.experts_format` "fp8"), the rest
        stream = fp8.read(files, block_fp8, placer.dtype, skipped, keep=_fp8_kept(table, config))  # dequantized
    elif mxfp4_checkpoint.parse_config(hf):  # MXFP4 experts: their blocks and scales kept packed
        stream = mxfp4_checkpoint.combine(iter_tensors(files, quantized=mxfp4_checkpoint.STORED))
    else:
        stream = iter_tensors(files, quantized=scheme is not None)
    not_loaded: dict[str, int] = {}  # per ignored prefix, how many tensors it skipped
    for name, tensor in stream if scheme is None else combine(stream, scheme):
        spec = table.get(name)
        if spec is None:
            if name.startswith(skipped):  # declared unused by the family: counted for the note
                prefix = next(p for p in skipped if name.startswith(p))
                not_loaded[prefix] = not_loaded.get(prefix, 0) + 1
                continue
            if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_embeddings):
                continue
            raise CheckpointError(f"unexpected tensor {name} in the checkpoint",
                                  f"it does not fit a {config.family} model with this config.json")
        if tuple(tensor.shape) != spec.shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {spec.shape}",
                                  "config.json and the weights disagree; re-download the checkpoint")
        if isinstance(tensor, Packed):   # a quantized checkpoint's matrix, already [in, out]
            for t in spec.targets:
                placer.put(t.module, t.param, t.expert, tensor)
            continue
        if isinstance(tensor, fp8.PackedFP8):   # block-FP8 experts, standing for [..., out, in]
            for t in spec.targets:
                placer.put(t.module, t.param, t.expert, fp8.select(tensor, t, config.quant.block))
            continue
        if isinstance(tensor, mxfp4_checkpoint.PackedMXFP4):   # MXFP4 experts, standing for [e, in, out]
            for t in spec.targets:
                placer.put(t.module, t.param, t.expert, mxfp4_checkpoint.select(tensor, t))
            continue
        if tensor.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name} has dtype {tensor.dtype}: quantized and non-float checkpoints "
                                  "are not supported", QUANTIZED_HINT)
        for t in spec.targets:
            part = t.select(tensor)
            part = np.swapaxes(part, -1, -2) if t.transpose else part
            if t.expert is None:  # a whole parameter (fused experts included)
                placer.whole(t.module, t.param, part)
            else:                 # one expert of a stacked parameter
                placer.expert(t.module, t.param, t.expert, part)
        del tensor

    logical = {(module, quant.float_name(param) if placer.quant else param)
               for module, group in shapes.items() for param in group}
    for module, param in sorted(logical):
        if not placer.done(module, param):
            expert = placer.first_missing_expert(module, param)
            hf_name, spec = (table_targets(table, module, param, expert)
                             or table_targets(table, module, param, None))[0]
            raise CheckpointError(f"tensor {hf_name} (shape {spec.shape}) is missing from the checkpoint",
                                  "the download is incomplete or the weights belong to another model")
    if not_loaded and notes is not None:
        notes.append("not loaded: " + ", ".join(f"{n} tensors of {prefix}*" for prefix, n in not_loaded.items())
                     + f" (the {config.family} family declares them unused, {ignored_reason(config)})")
    return placer.params


def _fp8_kept(table, config: ModelConfig):
    """Which FP8 checkpoint tensors stay packed: those whose every target is a parameter `config.quant`
    keeps as block-FP8 (`quant.is_fp8`: the experts, unless `--quantize` asks for integers)."""
    def keep(name: str) -> bool:
        spec = table.get(name)
        return spec is not None and all(quant.is_fp8(f"{t.module}/{t.param}", config.quant) for t in spec.targets)
    return keep


def table_targets(table, module: str, param: str, expert: int | None) -> list:
    """The checkpoint tensors that fill (module, param) or one expert of it, per-expert names first."""
    return [(name, spec) for name, spec in table.items()
            if any((t.module, t.param, t.expert) == (module, param, expert) for t in spec.targets)]
