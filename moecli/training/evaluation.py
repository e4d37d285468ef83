"""Validation during and after training: the held-out loss in capacity and dropless mode, the
unigram baseline it must beat, and the per-layer expert-utilisation table (used by `moecli.training.train`)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from moecli.errors import UsageError
from moecli.kernels import registry
from moecli.model.config import ModelConfig
from moecli.model.sizes import parameter_counts
from moecli.model.transformer import transformed
from moecli.training.losses import cross_entropy, dropped_fraction
from moecli.training.state import STATE_DIR

LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"


def make_eval_step(config: ModelConfig, batch_tokens: int):
    """Jitted (params, batch) -> (summed loss, expert counts [layers, E], dropped [layers])."""
    apply = transformed(config, ops=registry.select()).apply
    capacity = config.capacity(batch_tokens) if config.capacity_factor > 0 else None

    def step(params, batch):
        logits, _, routing = apply(params, batch[:, :-1])
        loss = jnp.sum(cross_entropy(logits, batch[:, 1:]))
        counts = jnp.sum(jax.nn.one_hot(routing.experts, config.n_experts, dtype=jnp.float32), axis=(1, 2, 3))
        dropped = (dropped_fraction(routing.experts, capacity, config.n_experts) if capacity is not None
                   else jnp.zeros(routing.experts.shape[0]))
        return loss, counts, dropped

    return jax.jit(step)


def eval_windows(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None) -> np.ndarray:
    """Non-overlapping windows of the validation stream, [n_batches, batch_size, seq_len + 1],
    spread evenly over it when there are more than max_batches * batch_size."""
    n_windows = (len(tokens) - 1) // seq_len
    n_batches = n_windows // batch_size
    if n_batches == 0:
        raise UsageError(f"the validation text has {len(tokens)} tokens, fewer than one batch "
                         f"({batch_size} x {seq_len + 1})", "hold out more text, or lower --batch-size/--seq-len")
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    picks = np.linspace(0, n_windows - 1, n_batches * batch_size).round().astype(int)
    windows = np.stack([tokens[i * seq_len:i * seq_len + seq_len + 1] for i in picks])
    return windows.reshape(n_batches, batch_size, seq_len + 1).astype(np.int32)


def evaluate(eval_step, params, windows: np.ndarray, count=None) -> dict:
    """Mean validation loss per token, per-layer expert fractions and drop rates.
    `count(done, total)`, if given, is called after each batch (a progress display)."""
    total, counts, dropped = 0.0, 0.0, 0.0
    for i, batch in enumerate(windows):
        loss, c, d = eval_step(params, jnp.asarray(batch))
        total, counts, dropped = total + float(loss), counts + np.asarray(c), dropped + np.asarray(d)
        if count is not None:
            count(i + 1, len(windows))
    n_tokens = windows.shape[0] * windows.shape[1] * (windows.shape[2] - 1)
    return {"loss": total / n_tokens, "fractions": counts / counts.sum(axis=-1, keepdims=True),
            "dropped": dropped / len(windows)}


def final_validation(phases, config, params, windows, eval_capacity, eval_dropless) -> tuple[dict, dict]:
    """(capacity, dropless): `evaluate` in both routing modes, each shown as a phase with a batch
    count. This is the slow end of a run: 2 x len(windows) full forward passes (one pass when
    training was dropless, capacity factor 0: both modes are then the same)."""
    modes = [("dropless routing", eval_dropless)]
    if config.capacity_factor > 0:
        modes.insert(0, (f"capacity routing (factor {config.capacity_factor})", eval_capacity))
    results = []
    for mode, eval_step in modes:
        with phases(f"final validation, {mode}") as phase:
            result = evaluate(eval_step, params, windows, phase.count)
            phase.detail = f"loss {result['loss']:.4f}"
        results.append(result)
    return results[0], results[-1]


# ----------------------------------------------------------------------------- the report (80 columns)

#: Expert columns per utilisation table: with the layer and drop columns, 8 fit in 80 columns
#: even if every cell reads 100.0; more experts are shown as several tables of 8 (the drop
#: column, one per layer, in the first).
EXPERTS_PER_TABLE = 8


def utilisation_report(fractions: np.ndarray, dropped: np.ndarray, capacity_factor: float) -> list:
    """The expert-utilisation report, as renderables: per layer, each expert's share of the routed
    validation tokens in percent (dropless routing; even = 100 / n_experts), and the share of
    assignments capacity routing drops (when it drops: capacity factor > 0). Explanations are
    lines of their own, not table titles (a title wider than its table wraps)."""
    from rich import box
    from rich.table import Table

    n_layers, n_experts = fractions.shape
    parts: list = [f"[bold]expert load[/]: % of the routed validation tokens, dropless (even = {100 / n_experts:.1f})"]
    for first in range(0, n_experts, EXPERTS_PER_TABLE):
        experts = range(first, min(first + EXPERTS_PER_TABLE, n_experts))
        with_drop = first == 0 and capacity_factor > 0
        table = Table(title=None if len(experts) == n_experts else f"experts {experts[0]}-{experts[-1]}",
                      box=box.MINIMAL_HEAVY_HEAD, show_edge=False)
        for header in ("layer", *(f"e{e}" for e in experts), *(["drop"] if with_drop else [])):
            table.add_column(header, justify="right")
        for layer in range(n_layers):
            cells = [f"{100 * fractions[layer, e]:.1f}" for e in experts]
            table.add_row(str(layer), *cells, *([f"{100 * dropped[layer]:.1f}%"] if with_drop else []))
        parts.append(table)
    if capacity_factor > 0:
        parts.append(f"drop: % of assignments over an expert's capacity (capacity factor {capacity_factor})")
    return parts


def loss_table(summary: dict):
    """The final losses, nats per token: both routing modes, the unigram baseline, training."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.MINIMAL_HEAVY_HEAD, show_edge=False)
    table.add_column(f"validation loss ({summary['val_tokens']:,} held-out tokens)")
    table.add_column("nats/token", justify="right")
    dropped = 100 * float(np.mean(summary["dropped_fraction"]))
    table.add_row("dropless routing (as moe chat runs)", f"{summary['val_loss_dropless']:.4f}")
    if summary["capacity_factor"] > 0:
        table.add_row(f"capacity factor {summary['capacity_factor']} ({dropped:.1f}% dropped)",
                      f"{summary['val_loss_capacity']:.4f}")
    table.add_row("unigram baseline (no context)", f"{summary['unigram_loss']:.4f}")
    if summary["train_loss"] is not None:
        table.add_row("training loss, recent steps", f"{summary['train_loss']:.4f}")
    return table


def final_report(tc, config, params, out, train_tokens, valid_tokens, eval_capacity, eval_dropless,
                 elapsed, tokens_seen, step, console, phases, max_batches: int = 48) -> dict:
    """Validation in both routing modes on up to max_batches batches of held-out text, the
    unigram baseline on the same tokens, the expert-utilisation and loss tables, and summary.json."""
    from moecli.training import data

    windows = eval_windows(valid_tokens, tc.batch_size, tc.seq_len, max_batches)
    capacity, dropless = final_validation(phases, config, params, windows, eval_capacity, eval_dropless)
    unigram = data.unigram_loss(train_tokens, windows[..., 1:].reshape(-1), config.vocab_size)
    recent_train = []
    log_path = out / STATE_DIR / LOG_FILE
    if log_path.is_file():
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        recent_train = [r["ce"] for r in lines if "ce" in r][-5:]   # the last 50 steps (logged every 10)

    total, active, _ = parameter_counts(config)
    summary = {
        "step": step,
        "tokens_seen": tokens_seen,
        "train_seconds": round(elapsed, 1),
        "train_loss": float(np.mean(recent_train)) if recent_train else None,
        "val_loss_capacity": capacity["loss"],
        "val_loss_dropless": dropless["loss"],
        "unigram_loss": unigram,
        "val_tokens": int(windows[..., 1:].size),
        "capacity_factor": config.capacity_factor,
        "dropped_fraction": [float(x) for x in capacity["dropped"]],
        "expert_fractions": [[float(x) for x in row] for row in dropless["fractions"]],
        "parameters": total,
        "active_parameters": active,
    }
    (out / STATE_DIR / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    for part in utilisation_report(dropless["fractions"], capacity["dropped"], config.capacity_factor):
        console.print(part, highlight=False)
    console.print(loss_table(summary))
    return summary
