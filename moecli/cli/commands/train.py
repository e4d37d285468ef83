"""`moe train`: train a small Mixtral-style MoE from scratch and save it as a Hugging Face checkpoint.

    moe train --out runs/bard                      # the bundled model's recipe (weights/bardmoe)
    moe train --out runs/bard --resume --steps 3000  # continue a run, here to a later step

See `moecli.training.train` for the recipe and `moecli.training.data` for the corpus and tokenizer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moecli.cli.app import command
from moecli.training.data import HELD_OUT


@command("train")
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: the exported checkpoint, plus train_state/."),
    data: Optional[Path] = typer.Option(None, "--data", help="A .tar.xz of .txt works or a folder of .txt files "
                                        "(default: the bundled Shakespeare archive)."),
    held_out: str = typer.Option(",".join(HELD_OUT), "--held-out", help="Comma-separated works held out for validation."),
    vocab_size: int = typer.Option(2048, "--vocab-size", help="Tokenizer vocabulary size (sentencepiece BPE)."),
    layers: int = typer.Option(4, "--layers", help="Decoder layers (all MoE)."),
    d_model: int = typer.Option(192, "--d-model", help="Residual stream width."),
    heads: int = typer.Option(4, "--heads", help="Query heads."),
    kv_heads: int = typer.Option(2, "--kv-heads", help="Key/value heads (grouped-query attention)."),
    head_dim: int = typer.Option(48, "--head-dim", help="Size of each attention head."),
    experts: int = typer.Option(8, "--experts", help="Experts per MoE layer."),
    top_k: int = typer.Option(2, "--top-k", help="Experts each token is routed to."),
    d_expert: int = typer.Option(384, "--d-expert", help="Hidden size of each expert's SwiGLU FFN."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Total optimiser steps (default: 2000; with "
                                        "--resume, the saved run's)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per step."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per sequence (the context trained)."),
    lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate."),
    min_lr_ratio: float = typer.Option(0.1, "--min-lr-ratio", help="Final learning rate as a fraction of --lr."),
    warmup: int = typer.Option(100, "--warmup", help="Linear warmup steps."),
    weight_decay: float = typer.Option(0.1, "--weight-decay", help="AdamW weight decay (matrices only)."),
    clip_norm: float = typer.Option(1.0, "--clip-norm", help="Global gradient-norm clipping threshold."),
    capacity_factor: float = typer.Option(1.25, "--capacity-factor", help="Expert capacity while training (0 = dropless)."),
    aux_loss: float = typer.Option(0.01, "--aux-loss", help="Load-balancing loss coefficient."),
    z_loss: float = typer.Option(0.001, "--z-loss", help="Router z-loss coefficient (0 = off)."),
    eval_interval: int = typer.Option(100, "--eval-interval", help="Steps between validation losses."),
    eval_batches: int = typer.Option(8, "--eval-batches", help="Validation batches per evaluation."),
    checkpoint_interval: int = typer.Option(250, "--checkpoint-interval", help="Steps between checkpoints."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation and batch sampling."),
    export_dtype: str = typer.Option("bfloat16", "--export-dtype", help="dtype of model.safetensors: bfloat16, float32 or float16."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --out (its model and data "
                                "settings are kept; --steps may raise the target)."),
) -> None:
    """Train a Mixtral-style MoE language model from scratch (float32, CPU or accelerator)."""
    from moecli.errors import UsageError
    from moecli.checkpoints.export import EXPORT_DTYPES
    from moecli.training.train import TrainConfig, run

    if export_dtype not in EXPORT_DTYPES:
        raise UsageError(f"unknown --export-dtype {export_dtype!r}", f"choose one of: {', '.join(EXPORT_DTYPES)}")
    names = tuple(name.strip() for name in held_out.split(",") if name.strip())
    tc = TrainConfig(
        data=str(data) if data is not None else None, held_out=names, vocab_size=vocab_size, n_layers=layers,
        d_model=d_model, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, n_experts=experts, top_k=top_k,
        d_expert=d_expert, steps=steps if steps is not None else 2000, batch_size=batch_size, seq_len=seq_len,
        lr=lr, min_lr_ratio=min_lr_ratio, warmup=warmup, weight_decay=weight_decay, clip_norm=clip_norm,
        capacity_factor=capacity_factor, aux_loss_coef=aux_loss, z_loss_coef=z_loss, eval_interval=eval_interval,
        eval_batches=eval_batches, checkpoint_interval=checkpoint_interval, seed=seed, export_dtype=export_dtype)
    if resume and steps is None:
        tc.steps = -1  # sentinel: keep the saved run's target
    run(tc, out, resume=resume)
