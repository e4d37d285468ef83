"""A checkpoint folder checked and summarised from its config.json and safetensors headers alone."""
from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

from rich.table import Table

from moecli.checkpoints import compressed_tensors, fp8
from moecli.checkpoints.families import load_config, read_config_json
from moecli.checkpoints.stored_size import StoredWeights, stored_weights
from moecli.checkpoints.safetensors import INDEX, SAFETENSORS_DTYPES, check_dtypes, check_safetensors, safetensors_files
from moecli.errors import CheckpointError
from moecli.hub.progress import human_bytes, human_count
from moecli.model.sizes import ACTIVE_CONVENTION, parameter_counts


@dataclasses.dataclass(frozen=True)
class CheckpointSummary:
    """What `validate_checkpoint` found: enough to tell the user what they downloaded."""

    folder: Path
    architecture: str       # "mixtral (MixtralForCausalLM)"
    layers: int
    experts: int
    top_k: int
    total_params: int
    active_params: int      # per token: top_k experts per MoE layer (`ACTIVE_CONVENTION`)
    dtype: str              # most of the weight bytes, e.g. "bfloat16"
    size_bytes: int         # the safetensors files on disk
    shards: int
    weights: StoredWeights  # the weights' bytes as stored, from config.json (`moecli.checkpoints.stored_size`)


def validate_checkpoint(folder: str | Path) -> CheckpointSummary:
    """Check a checkpoint folder before loading it and summarise it.

    Raises `ConfigError` for a missing/unsupported config.json, `CheckpointError` for a missing shard,
    a truncated/corrupt safetensors file or a quantized tensor (naming it). Reads only config.json and the safetensors
    headers, so it is fast on any size of model.
    """
    folder = Path(folder)
    config = load_config(folder)
    hf_config = read_config_json(folder)
    files = safetensors_files(folder)
    dtype_bytes: collections.Counter[str] = collections.Counter()
    names_by_file: dict[str, set[str]] = {}
    size = 0
    block_fp8 = fp8.parse_config(hf_config)
    readable = fp8.STORED if block_fp8 else compressed_tensors.parse_config(hf_config) is not None
    if block_fp8:
        fp8.check_headers(fp8.merged_headers(files), block_fp8)  # every FP8 weight has its block scales
    for path in files:
        header, _ = check_safetensors(path)
        check_dtypes(path, header, quantized=readable)
        size += path.stat().st_size
        names_by_file[path.name] = {k for k in header if k != "__metadata__"}
        for name, info in header.items():
            if name != "__metadata__":
                dtype_bytes[info["dtype"]] += info["data_offsets"][1] - info["data_offsets"][0]

    index = folder / INDEX
    if index.is_file():
        for name, shard in json.loads(index.read_text())["weight_map"].items():
            if name not in names_by_file.get(shard, ()):
                raise CheckpointError(f"tensor {name} is not in {shard}, although {INDEX} says so",
                                      "the shards and the index disagree; download the checkpoint again")

    architectures = hf_config.get("architectures") or []
    arch = f"{config.family} ({architectures[0]})" if architectures else config.family
    total, active, _ = parameter_counts(config)
    dtype = dtype_bytes.most_common(1)[0][0] if dtype_bytes else "?"
    return CheckpointSummary(
        folder=folder, architecture=arch, layers=config.n_layers, experts=config.n_experts,
        top_k=config.top_k, total_params=total, active_params=active,
        dtype=stored_as(hf_config, SAFETENSORS_DTYPES.get(dtype, dtype.lower())), size_bytes=size,
        shards=len(files), weights=stored_weights(config, hf_config))


def stored_as(hf_config: dict, dtype: str) -> str:
    """How the weights are stored: a float dtype, or a quantized checkpoint's scheme."""
    scheme = compressed_tensors.parse_config(hf_config)
    block_fp8 = fp8.parse_config(hf_config)
    if block_fp8 is not None:
        return f"{block_fp8.label()} (float8_e4m3fn, a scale per block; dequantized at load)"
    if scheme is None:
        return dtype
    group = f"groups of {scheme.group_size}" if scheme.group_size else "per channel"
    return f"int{scheme.bits} (compressed-tensors W{scheme.bits}A16, {group})"


def summary_table(summary: CheckpointSummary) -> Table:
    """A two-column rich table of a `CheckpointSummary`, for the CLI to print."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("Folder", str(summary.folder))
    table.add_row("Architecture", summary.architecture)
    table.add_row("Layers", str(summary.layers))
    table.add_row("Experts", f"{summary.experts} ({summary.top_k} active per token)")
    table.add_row("Parameters", f"{human_count(summary.total_params)} total, "
                                f"{human_count(summary.active_params)} active per token ({ACTIVE_CONVENTION})")
    table.add_row("Weights", f"{summary.dtype}, {summary.shards} safetensors file"
                             f"{'s' if summary.shards != 1 else ''}, {human_bytes(summary.size_bytes)} on disk")
    table.add_row("Weight bytes", f"{summary.weights.describe()} as stored (from config.json)")
    return table
