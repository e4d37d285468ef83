"""Reading Hugging Face safetensors checkpoints into moecli's parameter tree, tensor by tensor.

A checkpoint folder holds `config.json` and either `model.safetensors` or several shards listed
by `model.safetensors.index.json`. Each tensor is read (bf16 included, through ml_dtypes, without
torch), checked against the shape its family's table expects, converted to the target dtype and
placed; per-expert tensors fill a stacked [n_experts, ...] buffer that goes to the device as soon
as its last expert arrives. Host memory never holds two copies of the model.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open

from moecli.config import ModelConfig
from moecli.errors import CheckpointError
from moecli.families import checkpoint_tensors
from moecli.model import transformed

FLOAT_DTYPES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
INDEX = "model.safetensors.index.json"


def safetensors_files(folder: str | Path) -> list[Path]:
    """The checkpoint's safetensors files; every shard the index names must exist."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise CheckpointError(f"{index} is not a valid safetensors index",
                                  "re-download the checkpoint") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"shard {missing[0]} named by {INDEX} is missing from {folder}",
                                  "the download is incomplete; run `moe download` again to resume it")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {folder}",
                              "moecli reads safetensors checkpoints only (not .bin, .pt or .gguf)")
    return files


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of every file, one at a time."""
    for path in files:
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises several types for damaged files
            raise CheckpointError(f"{path.name} is truncated or corrupt ({str(err).splitlines()[0]})",
                                  "re-download the checkpoint") from None


def expected_params(config: ModelConfig) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
    """Shapes of every parameter of the model, without allocating any."""
    model = transformed(config)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))


def load_params(folder: str | Path, config: ModelConfig, dtype) -> dict:
    """Read the checkpoint in `folder` into a Haiku parameter tree of `dtype` arrays."""
    table = checkpoint_tensors(config)
    shapes = expected_params(config)
    dtype = np.dtype(dtype)
    params: dict[str, dict[str, jax.Array]] = {m: {} for m in shapes}
    pending: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}  # stacked buffers, filled flags

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
            raise CheckpointError(f"tensor {name} has dtype {tensor.dtype}, which moecli cannot run",
                                  "use an unquantized float16/bfloat16/float32 checkpoint")
        for t in spec.targets:
            part = tensor if t.rows is None else tensor[..., t.rows[0]:t.rows[1], :]
            part = np.swapaxes(part, -1, -2) if t.transpose else part
            target_shape = shapes[t.module][t.param].shape
            if t.expert is None:  # a whole parameter (fused experts included): straight to the device
                params[t.module][t.param] = jnp.asarray(part.astype(dtype))
                continue
            key = (t.module, t.param)
            if key not in pending:
                pending[key] = (np.empty(target_shape, dtype), np.zeros(target_shape[0], bool))
            buffer, filled = pending[key]
            buffer[t.expert], filled[t.expert] = part, True
            if filled.all():  # last expert arrived: move the stack to the device, free the buffer
                params[t.module][t.param] = jnp.asarray(pending.pop(key)[0])
        del tensor

    for module, group in shapes.items():
        for param in group:
            if param not in params[module]:
                filled = pending[(module, param)][1] if (module, param) in pending else None
                expert = int(np.argmin(filled)) if filled is not None else 0
                hf_name, spec = (table_targets(table, module, param, expert)
                                 or table_targets(table, module, param, None))[0]
                raise CheckpointError(f"tensor {hf_name} (shape {spec.shape}) is missing from the checkpoint",
                                      "the download is incomplete or the weights belong to another model")
    return params


def table_targets(table, module: str, param: str, expert: int | None) -> list:
    """The checkpoint tensors that fill (module, param) or one expert of it, per-expert names first."""
    return [(name, spec) for name, spec in table.items()
            if any((t.module, t.param, t.expert) == (module, param, expert) for t in spec.targets)]
