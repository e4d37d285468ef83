"""`moe download`: fetch what inference needs from the Hugging Face Hub, then validate it."""
from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console

from moecli.cli.app import command


@command("download")
def download(
    repo_id: str = typer.Argument(..., metavar="REPO_ID",
                                  help="Hub repo id, e.g. mistralai/Mixtral-8x7B-Instruct-v0.1."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit [default: main]."),
    local_dir: Optional[str] = typer.Option(None, "--local-dir",
                                            help="Download into this folder instead of the HF cache."),
    token: Optional[str] = typer.Option(None, "--token",
                                        help="Hub token for gated or private repos [default: $HF_TOKEN]."),
) -> None:
    """Download a checkpoint's config, safetensors weights and tokenizer (never .bin/.pt/.gguf),
    resuming an interrupted download, then validate it and print a summary."""
    from moecli.hub import download as hub

    folder = hub.download(repo_id, revision=revision, local_dir=local_dir, token=token)
    summary = hub.validate_checkpoint(folder)
    console = Console()
    console.print(hub.summary_table(summary))
    console.print(f"saved in {folder}")
