"""Training checkpoints: parameters, optimiser state, step and settings in OUT/train_state/, so
`moe train --resume` continues exactly where a run stopped (used by `moecli.training.train`)."""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moecli.errors import UsageError

STATE_DIR = "train_state"
STATE_FILE = "state.pkl"


def save_state(folder: Path, step: int, params, opt_state, tc, extra: dict) -> Path:
    """Write params, optimiser state (its leaves, in order), step and settings to
    folder/train_state/state.pkl, atomically (a crash mid-write leaves the old file)."""
    state_dir = folder / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "params": jax.tree_util.tree_map(np.asarray, params),
        "opt_state": [np.asarray(x) for x in jax.tree_util.tree_leaves(opt_state)],
        "train_config": dataclasses.asdict(tc),
        **extra,
    }
    tmp = state_dir / (STATE_FILE + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(state_dir / STATE_FILE)
    return state_dir / STATE_FILE


def load_state(folder: Path) -> dict:
    path = folder / STATE_DIR / STATE_FILE
    if not path.is_file():
        raise UsageError(f"no training state in {folder} to resume", "run without --resume to start training")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError) as err:
        raise UsageError(f"cannot read {path} ({err})", "the checkpoint is damaged; start a new run") from None


def restore(state: dict, optimizer: optax.GradientTransformation):
    """(params, opt_state) as device arrays, the optimiser state rebuilt on a fresh template."""
    params = jax.tree_util.tree_map(jnp.asarray, state["params"])
    treedef = jax.tree_util.tree_structure(optimizer.init(params))
    opt_state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in state["opt_state"]])
    return params, opt_state


def train_config_from(saved: dict):
    """The TrainConfig a checkpoint was written with (fields added since then keep defaults)."""
    from moecli.training.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in saved.items() if k in fields}
    saved["held_out"] = tuple(saved.get("held_out", ()))
    return TrainConfig(**saved)
