"""`moe info`: what a checkpoint is, and where its experts would go — without loading it."""
from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from moecli.cli.app import command


@command("info")
def info(
    model: str = typer.Argument(..., metavar="MODEL", help="Checkpoint folder or Hub repo id."),
    devices: Optional[int] = typer.Option(None, "--devices", help="Show the placement over N devices "
                                                                  "[default: as `moe generate` would]."),
    dtype: str = typer.Option("auto", "--dtype", help="Weights' dtype for the byte counts."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision when MODEL is a repo id."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="Count the bytes as `--quantize q8|q4` "
                                                                    "would store the weights."),
) -> None:
    """Print the architecture, the parameter counts, the weights' and the KV cache's bytes, and the
    placement map: for each device, which experts of which layers it holds and how many bytes of parameters."""
    import jax
    import numpy as np

    from moecli.hub import download as hub
    from moecli.checkpoints.families import load_config
    from moecli.inference.engine import quant_config, resolve_dtype
    from moecli.errors import ResourceError
    from moecli.inference.routing import moe_layer_numbers
    from moecli.model.sharding import default_devices, make_mesh
    from moecli.model.sizes import placement

    folder = hub.resolve_model(model, revision=revision)
    summary = hub.validate_checkpoint(folder)
    console = Console()
    config = load_config(folder)
    table = hub.summary_table(summary)
    table.add_row("KV cache", kv_cache_line(config, resolve_dtype(dtype)))
    console.print(table)
    if quantize:
        config = config.replace(quant=quant_config(quantize))
    n = default_devices(config) if devices is None else devices
    available = jax.devices()
    try:
        make_mesh(config, n)  # the same checks as loading: enough devices, experts divide evenly
        names = [f"{d.platform}:{d.id}" for d in available[:n]]
    except ResourceError:  # more devices than this machine has: still show the plan
        names = [f"device {d} (not here)" for d in range(n)]
    itemsize = np.dtype(resolve_dtype(dtype)).itemsize
    layers = moe_layer_numbers(config)
    stored = np.dtype(resolve_dtype(dtype)).name + (f", {config.quant.label()}" if config.quant else "")
    table = Table(title=f"placement over {n} device{'s' if n > 1 else ''} ({stored})")
    for column in ("device", "experts", "of MoE layers", "expert bytes", "other bytes", "total"):
        table.add_column(column, justify="left" if column in ("device", "experts", "of MoE layers") else "right")
    span = f"{layers[0]}..{layers[-1]} ({len(layers)})" if layers else "none"
    for p in placement(config, n, itemsize, names):
        experts = f"{p.experts[0]}..{p.experts[1]}" if layers else "-"
        table.add_row(p.device, experts, span, hub.human_bytes(p.expert_bytes), hub.human_bytes(p.replicated_bytes),
                      hub.human_bytes(p.total_bytes))
    console.print(table)


def kv_cache_line(config, dtype) -> str:
    """'70,272 B per token at bfloat16: 61 layers x 1,152 B (LatentCache); 8.6 GiB at the full 131,072-token
    context', from the per-layer caches themselves (`moecli.model.sizes.kv_cache_bytes`)."""
    import numpy as np

    from moecli.hub.progress import human_bytes
    from moecli.model.sizes import cache_bytes_at, kv_cache_bytes

    groups = kv_cache_bytes(config, dtype)
    per_token = sum(g.layers * g.bytes_per_token for g in groups)
    kinds = "; ".join(
        f"{g.layers} layer{'s' if g.layers != 1 else ''} x {g.bytes_per_token:,} B ({g.kind}"
        + (f", a {g.window:,}-token sliding window: capped at it" if g.window else "")
        + (f", + {g.fixed_bytes:,} B each whatever the length" if g.fixed_bytes else "") + ")" for g in groups)
    context = config.max_position_embeddings
    return (f"{per_token:,} B per token at {np.dtype(dtype).name}: {kinds}; "
            f"{human_bytes(cache_bytes_at(groups, context))} at the full {context:,}-token context")
