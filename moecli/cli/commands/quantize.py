"""`moe quantize`: a float checkpoint rewritten as a W4A16 / W8A16 compressed-tensors checkpoint.

The work is `moecli.checkpoints.quantize.quantize_checkpoint`; this command resolves SRC (a folder,
or a Hub repo id from the cache or downloaded), checks --bits and --out before anything is read or
downloaded, and prints one summary line: the scheme, the bytes before and after, how many Linears
stay float (the config's `ignore` list) and where the result is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moecli.cli.app import command


@command("quantize")
def quantize(
    src: str = typer.Argument(..., metavar="SRC", help="Float checkpoint folder or Hub repo id."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the quantized checkpoint (new or empty)."),
    bits: int = typer.Option(4, "--bits", help="4 (W4A16) or 8 (W8A16) bits per weight."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision when SRC is a repo id."),
) -> None:
    """Write SRC's experts and dense Linear layers as integers in groups of 32 (symmetric,
    compressed-tensors format, read by `moe chat --model OUT`, transformers and vLLM); embeddings,
    norms, routers and (at 4 bits) the LM head stay as they are."""
    from moecli.checkpoints import compressed_tensors as ct
    from moecli.checkpoints.families import read_config_json
    from moecli.checkpoints.quantize import check_target, quantize_checkpoint
    from moecli.checkpoints.safetensors import safetensors_files
    from moecli.hub import download as hub

    check_target(out, bits)
    folder = hub.resolve_model(src, revision=revision)
    dst = quantize_checkpoint(folder, out, bits)
    scheme = ct.parse_config(read_config_json(dst))
    before, after = (sum(f.stat().st_size for f in safetensors_files(d)) for d in (folder, dst))
    print(f"W{bits}A16 (int{bits}, symmetric, groups of {scheme.group_size}): {hub.human_bytes(before)} -> "
          f"{hub.human_bytes(after)}; {len(scheme.ignore)} Linear layers kept in float (the ignore list); "
          f"saved in {dst}")
