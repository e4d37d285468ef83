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


def evaluate(eval_step, params, windows: np.ndarray) -> dict:
    """Mean validation loss per token, per-layer expert fractions and drop rates."""
    total, counts, dropped = 0.0, 0.0, 0.0
    for batch in windows:
        loss, c, d = eval_step(params, jnp.asarray(batch))
        total, counts, dropped = total + float(loss), counts + np.asarray(c), dropped + np.asarray(d)
    n_tokens = windows.shape[0] * windows.shape[1] * (windows.shape[2] - 1)
    return {"loss": total / n_tokens, "fractions": counts / counts.sum(axis=-1, keepdims=True),
            "dropped": dropped / len(windows)}


def final_report(tc, config, params, out, train_tokens, valid_tokens, eval_capacity, eval_dropless,
                 elapsed, tokens_seen, step, console, max_batches: int = 48) -> dict:
    """Validation in both routing modes on up to max_batches batches of held-out text, the
    unigram baseline on the same tokens, the expert-utilisation table, and summary.json."""
    from rich.table import Table

    from moecli.training import data

    windows = eval_windows(valid_tokens, tc.batch_size, tc.seq_len, max_batches)
    capacity = evaluate(eval_capacity, params, windows)
    dropless = evaluate(eval_dropless, params, windows)
    unigram = data.unigram_loss(train_tokens, windows[..., 1:].reshape(-1), config.vocab_size)
    recent_train = []
    log_path = out / STATE_DIR / LOG_FILE
    if log_path.is_file():
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        recent_train = [r["ce"] for r in lines if "ce" in r][-5:]   # the last 50 steps (logged every 10)

    table = Table(title=f"expert utilisation: fraction of routed tokens per expert (dropless, validation; "
                        f"even = {1 / config.n_experts:.3f})")
    table.add_column("layer")
    for e in range(config.n_experts):
        table.add_column(f"e{e}", justify="right")
    table.add_column("drop", justify="right")
    for layer, row in enumerate(dropless["fractions"]):
        table.add_row(str(layer), *(f"{x:.3f}" for x in row), f"{100 * capacity['dropped'][layer]:.1f}%")
    console.print(table)
    total, active = config.parameter_counts()
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
    console.print(f"validation loss {dropless['loss']:.4f} dropless, {capacity['loss']:.4f} with capacity factor "
                  f"{config.capacity_factor}; unigram baseline {unigram:.4f} (nats per token)")
    console.print(f"saved a Hugging Face checkpoint in {out} ({tc.export_dtype}); chat with it: moe chat -m {out}")
    return summary
