"""`TrainConfig`: every setting of a training run, declared once.

Each field carries its default, its `moe train` flag and its help text (in the field's metadata),
so the command line (`moecli.cli.commands.train`) is generated from this class and cannot drift
from it. The defaults are the recipe of the bundled model, weights/bardmoe.

Metadata keys of a field:

* ``flag``, ``help``: the `moe train` option and its help; a field without ``flag`` has no option.
* ``resumable``: `moe train --resume` may change it (the run's length and bookkeeping); every
  other setting is fixed by the saved run, because changing it would not continue the same run.
* ``cli_type``, ``parse``, ``show``: for a field whose command-line form differs from its value:
  the option's type, a function turning a given option value into the field's value, and one
  turning the field's default into the option's default (``--held-out a,b`` is ``("a", "b")``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from moecli.errors import UsageError
from moecli.training.data import HELD_OUT


def setting(default, flag: str | None, help: str, **cli):
    """A TrainConfig field: its default, its `moe train` flag and help, and the cli keys above."""
    return dataclasses.field(default=default, metadata={"flag": flag, "help": help, **cli})


def names(text: str) -> tuple[str, ...]:
    """'macbeth, twelfth_night' -> ('macbeth', 'twelfth_night')."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run (the `moe train` flags); saved with the checkpoint."""

    data: str | None = setting(None, "--data", "A .tar.xz of .txt works or a folder of .txt files (default: the "
                               "bundled Shakespeare archive).", cli_type=Path, parse=str)
    held_out: tuple[str, ...] = setting(HELD_OUT, "--held-out", "Comma-separated works held out for validation.",
                                        cli_type=str, parse=names, show=",".join)
    vocab_size: int = setting(2048, "--vocab-size", "Tokenizer vocabulary size (sentencepiece BPE).")
    n_layers: int = setting(4, "--layers", "Decoder layers (all MoE).")
    d_model: int = setting(192, "--d-model", "Residual stream width.")
    n_heads: int = setting(4, "--heads", "Query heads.")
    n_kv_heads: int = setting(2, "--kv-heads", "Key/value heads (grouped-query attention).")
    head_dim: int = setting(48, "--head-dim", "Size of each attention head.")
    n_experts: int = setting(8, "--experts", "Experts per MoE layer.")
    top_k: int = setting(2, "--top-k", "Experts each token is routed to.")
    d_expert: int = setting(384, "--d-expert", "Hidden size of each expert's SwiGLU FFN.")
    rope_theta: float = setting(10000.0, None, "Rotary embedding base (not a flag).")
    steps: int = setting(2000, "--steps", "Total optimiser steps (with --resume: the saved run's target unless "
                         "given).", resumable=True)
    batch_size: int = setting(16, "--batch-size", "Sequences per step.")
    seq_len: int = setting(256, "--seq-len", "Tokens per sequence (the context trained).")
    lr: float = setting(2e-3, "--lr", "Peak learning rate.")
    min_lr_ratio: float = setting(0.1, "--min-lr-ratio", "Final learning rate as a fraction of --lr.")
    warmup: int = setting(100, "--warmup", "Linear warmup steps.")
    weight_decay: float = setting(0.1, "--weight-decay", "AdamW weight decay (matrices only).")
    clip_norm: float = setting(1.0, "--clip-norm", "Global gradient-norm clipping threshold.")
    capacity_factor: float = setting(1.25, "--capacity-factor", "Expert capacity while training (0 = dropless).")
    aux_loss_coef: float = setting(0.01, "--aux-loss", "Load-balancing loss coefficient.")
    z_loss_coef: float = setting(0.001, "--z-loss", "Router z-loss coefficient (0 = off).")
    eval_interval: int = setting(100, "--eval-interval", "Steps between validation losses.", resumable=True)
    eval_batches: int = setting(8, "--eval-batches", "Validation batches per evaluation.")
    checkpoint_interval: int = setting(250, "--checkpoint-interval", "Steps between checkpoints.", resumable=True)
    seed: int = setting(0, "--seed", "Seed for initialisation and batch sampling.")
    export_dtype: str = setting("bfloat16", "--export-dtype", "dtype of model.safetensors: bfloat16, float32 or "
                                "float16.")

    def validate(self) -> None:
        """Raise a UsageError naming the flag of the first setting that cannot train."""
        from moecli.checkpoints.export import EXPORT_DTYPES

        positive = ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "n_experts",
                    "top_k", "d_expert", "steps", "batch_size", "seq_len", "eval_interval", "eval_batches",
                    "checkpoint_interval")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"{flag_of(name)} must be positive, got {getattr(self, name)}",
                                 "pass a value of 1 or more")
        if self.top_k > self.n_experts:
            raise UsageError(f"top-k ({self.top_k}) exceeds the number of experts ({self.n_experts})",
                             "pass --top-k at most --experts")
        if self.head_dim % 2:
            raise UsageError(f"head-dim must be even for rotary embeddings, got {self.head_dim}", "pass an even --head-dim")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup < 0:
            raise UsageError("the learning-rate schedule needs lr > 0, 0 <= min-lr-ratio <= 1 and warmup >= 0",
                             "check --lr, --min-lr-ratio and --warmup")
        if self.capacity_factor < 0 or self.aux_loss_coef < 0 or self.z_loss_coef < 0 or self.weight_decay < 0:
            raise UsageError("capacity factor, loss coefficients and weight decay cannot be negative",
                             "pass 0 to turn one off")
        if self.vocab_size < 300:
            raise UsageError(f"vocab-size {self.vocab_size} is too small",
                             "the tokenizer needs 259 ids for <unk>, <s>, </s> and the 256 bytes, plus one per distinct "
                             "character; use 400 or more")
        if self.export_dtype not in EXPORT_DTYPES:
            raise UsageError(f"unknown --export-dtype {self.export_dtype!r}", f"choose one of: {', '.join(EXPORT_DTYPES)}")

    @classmethod
    def from_dict(cls, saved: dict) -> TrainConfig:
        """The TrainConfig saved as a dict (JSON): fields added since then keep their defaults,
        fields since removed are dropped; JSON's lists become tuples again."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in saved.items() if k in known}
        if "held_out" in values:
            values["held_out"] = tuple(values["held_out"])
        return cls(**values)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
RESUMABLE = tuple(name for name, f in FIELDS.items() if f.metadata.get("resumable"))


def flag_of(name: str) -> str:
    """The `moe train` flag of a field ('n_layers' -> '--layers'), or the field's name if it has none."""
    return FIELDS[name].metadata.get("flag") or name


def resumed(saved: TrainConfig, overrides: dict) -> TrainConfig:
    """The saved run's settings with `overrides` applied. Only RESUMABLE fields may change; any
    other given must equal the saved value (so repeating the original command with --resume works)."""
    fixed = [name for name, value in overrides.items() if name not in RESUMABLE and value != getattr(saved, name)]
    if fixed:
        raise UsageError(f"{', '.join(map(flag_of, fixed))} cannot change when resuming: a resumed run keeps its "
                         "saved settings", f"drop {'them' if len(fixed) > 1 else 'it'} (--resume accepts "
                         f"{', '.join(map(flag_of, RESUMABLE))}), or start a new run with another --out")
    return dataclasses.replace(saved, **overrides)
