"""Reading Hugging Face safetensors checkpoints into moecli's parameter tree, tensor by tensor.

A checkpoint folder holds `config.json` and either `model.safetensors` or several shards listed
by `model.safetensors.index.json`. Each tensor is read (bf16 included, through ml_dtypes, without
torch), checked against the shape its family's table expects, converted to the target dtype and
placed; per-expert tensors fill a stacked [n_experts, ...] buffer that goes to the device as soon
as its last expert arrives. Host memory never holds two copies of the model.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from moecli import env
from moecli.model.config import ModelConfig
from moecli.errors import QUANTIZED_HINT, CheckpointError, ResourceError
from moecli.checkpoints.families import checkpoint_tensors
from moecli.model.transformer import transformed
from moecli.checkpoints.placement import Placer, aligned_empty

FLOAT_DTYPES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)}
SAFE_DTYPES = ("F32", "F16", "BF16")  # the same, as safetensors headers spell them
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
INDEX = "model.safetensors.index.json"


def safetensors_files(folder: str | Path) -> list[Path]:
    """The checkpoint's safetensors files; every shard the index names must exist."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
            if not shards or not all(isinstance(s, str) and s and Path(s).name == s for s in shards):
                raise TypeError("shard names must be file names in the checkpoint folder")
        except OSError as err:
            raise CheckpointError(f"cannot read {index}: {err.strerror or err}", "check the file's permissions") from None
        except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a valid safetensors index",
                                  "re-download the checkpoint") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"shard {missing[0]} named by {INDEX} is missing from {folder}",
                                  "the download is incomplete; run `moe download` again to resume it")
        return [folder / s for s in shards]
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {folder}",
                              "moecli reads safetensors checkpoints only (not .bin, .pt or .gguf)")
    return files


def check_dtypes(path: Path, header: dict) -> None:
    """CheckpointError naming the first tensor of a safetensors header that moecli cannot load: a quantized
    one (int8, packed int4, float8, float4, ...) or another non-float (float64, bool)."""
    from moecli.hub.download import SAFETENSORS_DTYPES

    for name, info in header.items():
        dtype = info["dtype"] if name != "__metadata__" else None
        if dtype is None or dtype in SAFE_DTYPES or name.endswith(IGNORED_SUFFIXES):
            continue
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {name} in {path.name} has an unknown dtype {dtype[:20]!r}",
                                  "the file is corrupt or newer than this safetensors; re-download it")
        if dtype in ("F64", "BOOL"):
            raise CheckpointError(f"tensor {name} in {path.name} is {SAFETENSORS_DTYPES[dtype]}, which moecli "
                                  "cannot load", "convert the checkpoint to float16, bfloat16 or float32")
        raise CheckpointError(f"tensor {name} in {path.name} is {SAFETENSORS_DTYPES[dtype]}: quantized "
                              "checkpoints are not supported", QUANTIZED_HINT)


NUMPY_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every float tensor of every file, one at a time, in file order.

    Every file's header is checked first (complete, well formed, float dtypes only), so a truncated
    shard or a quantized checkpoint fails at once, before minutes of loading the shards before it.
    Tensors are read with plain file reads into fresh arrays rather than through a memory map: the
    pages of a mapped file count towards the process's memory while it stays mapped, which put a
    whole 1 GB shard on top of the loading peak (bf16: 1.36x the checkpoint; 1.3x is the target)."""
    from moecli.hub.download import check_safetensors

    headers = []
    for path in files:
        header, _ = check_safetensors(path)
        check_dtypes(path, header)
        headers.append(header)

    for path, header in zip(files, headers):
        tensors = sorted(((info["data_offsets"], name, info) for name, info in header.items()
                          if name != "__metadata__" and info["dtype"] in NUMPY_DTYPES), key=lambda t: t[0])
        try:
            with path.open("rb") as f:
                start = 8 + int.from_bytes(f.read(8), "little")  # data begins after the header
                for (begin, end), name, info in tensors:
                    shape, dtype = info.get("shape"), NUMPY_DTYPES[info["dtype"]]
                    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)
                            and math.prod(shape) * dtype.itemsize == end - begin):
                        raise CheckpointError(f"{path.name} is corrupt (tensor {name}: {end - begin} bytes for shape "
                                              f"{str(shape)[:80]})", "re-download the checkpoint")
                    array = aligned_empty(shape, dtype)  # so a whole tensor reaches the device without a copy
                    f.seek(start + begin)
                    if array.nbytes and f.readinto(array.reshape(-1).view(np.uint8)) != array.nbytes:
                        raise CheckpointError(f"{path.name} is truncated", "re-download the checkpoint")
                    yield name, array
        except OSError as err:
            raise CheckpointError(f"cannot read {path.name}: {err.strerror or err}", "check the file's permissions") from None


def expected_params(config: ModelConfig) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """Shapes of every parameter of the model, without allocating any."""
    model = transformed(config)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))


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
    total = config.parameter_counts()[0]
    experts = sum(config.moe_layers) * config.n_experts * 3 * config.d_model * config.d_expert
    split = n_devices > 1 and free.accelerator  # CPU devices all share the host's memory
    needed = (total - experts + -(-experts // n_devices) if split else total) * dtype.itemsize
    if needed <= free.free:
        return
    fixes = ["--dtype bfloat16 (half the memory of float32)"] if dtype.itemsize > 2 else []
    fixes += [f"--devices N (more than {n_devices}) to spread the experts over N devices"] if free.accelerator else []
    fixes += ["a smaller model" + ("" if free.accelerator else ", or free host memory")]
    who = f"each of {n_devices} devices needs" if split else "the weights need"
    raise ResourceError(f"{who} {human_bytes(needed)} in {dtype.name} but only {human_bytes(free.free)} is free "
                        f"{free.where}", "use " + ", or ".join(fixes) + " (MOECLI_NO_MEMORY_CHECK=1 skips this check)")


def load_params(folder: str | Path, config: ModelConfig, dtype, mesh=None) -> dict:
    """Read the checkpoint in `folder` into a Haiku parameter tree of `dtype` arrays, placed on
    the default device or, with a mesh, spread over its devices (`moecli.checkpoints.placement`)."""
    check_memory(config, dtype, 1 if mesh is None else mesh.devices.size)
    table = checkpoint_tensors(config)
    shapes = expected_params(config)
    placer = Placer(shapes, dtype, mesh)

    for name, tensor in iter_tensors(safetensors_files(folder)):
        spec = table.get(name)
        if spec is None:
            if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_embeddings):
                continue
            raise CheckpointError(f"unexpected tensor {name} in the checkpoint",
                                  f"it does not fit a {config.family} model with this config.json")
        if tuple(tensor.shape) != spec.shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {spec.shape}",
                                  "config.json and the weights disagree; re-download the checkpoint")
        if tensor.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name} has dtype {tensor.dtype}: quantized and non-float checkpoints "
                                  "are not supported", QUANTIZED_HINT)
        for t in spec.targets:
            part = tensor if t.rows is None else tensor[..., t.rows[0]:t.rows[1], :]
            part = np.swapaxes(part, -1, -2) if t.transpose else part
            if t.expert is None:  # a whole parameter (fused experts included)
                placer.whole(t.module, t.param, part)
            else:                 # one expert of a stacked parameter
                placer.expert(t.module, t.param, t.expert, part)
        del tensor

    for module, group in shapes.items():
        for param in group:
            if not placer.done(module, param):
                expert = placer.first_missing_expert(module, param)
                hf_name, spec = (table_targets(table, module, param, expert)
                                 or table_targets(table, module, param, None))[0]
                raise CheckpointError(f"tensor {hf_name} (shape {spec.shape}) is missing from the checkpoint",
                                      "the download is incomplete or the weights belong to another model")
    return placer.params


def table_targets(table, module: str, param: str, expert: int | None) -> list:
    """The checkpoint tensors that fill (module, param) or one expert of it, per-expert names first."""
    return [(name, spec) for name, spec in table.items()
            if any((t.module, t.param, t.expert) == (module, param, expert) for t in spec.targets)]
