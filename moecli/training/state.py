"""Training checkpoints: parameters, optimiser state, step and settings in OUT/train_state/, so
`moe train --resume` continues exactly where a run stopped (used by `moecli.training.train`).

The state is two files, neither of which can run code when read (moecli never unpickles):

* ``tensors-<step>-<tag>.safetensors``: the parameters (``params/<module>/<name>``) and the
  optimiser state's leaves in tree order (``opt_state/<index>``), as plain float/int arrays;
* ``state.json``: the step, the TrainConfig, a few counters (``extra``), and the name and size of
  the tensor file it belongs to.

Saving writes a new tensor file, then replaces state.json atomically (temp file + rename), then
deletes the previous tensor file: whenever it is interrupted, state.json names a complete tensor
file written with it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from moecli.errors import UsageError
from moecli.training.config import TrainConfig

STATE_DIR = "train_state"
STATE_FILE = "state.json"
OLD_STATE_FILE = "state.pkl"   # moecli < the safetensors format: never read
FORMAT = "moecli-train-state"
VERSION = 1


@dataclasses.dataclass
class SavedState:
    """A training state read back from disk (host numpy arrays)."""

    step: int
    params: dict                 # {module: {name: array}}, Haiku's layout
    opt_leaves: list             # the optimiser state's leaves, in jax.tree_util order
    train_config: TrainConfig
    extra: dict                  # JSON values: elapsed seconds, tokens seen, the model config


def has_state(folder: Path) -> bool:
    """Whether folder holds a training run; an old pickle-format run is an error, not a run."""
    state_dir = Path(folder) / STATE_DIR
    if (state_dir / STATE_FILE).is_file():
        return True
    if (state_dir / OLD_STATE_FILE).is_file():
        raise UsageError(f"{state_dir / OLD_STATE_FILE} is an old-format training state (a pickle), which moecli "
                         "no longer reads", "start a new run with another --out")
    return False


def save_state(folder: Path, step: int, params, opt_state, tc: TrainConfig, extra: dict) -> Path:
    """Write the state to folder/train_state/ (see the module docstring); returns state.json's path."""
    state_dir = Path(folder) / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"params/{module}/{name}": np.asarray(value)
               for module, group in params.items() for name, value in group.items()}
    tensors.update({f"opt_state/{i}": np.asarray(leaf) for i, leaf in enumerate(jax.tree_util.tree_leaves(opt_state))})
    tensor_file = f"tensors-{step:08d}-{secrets.token_hex(4)}.safetensors"
    tmp = state_dir / (tensor_file + ".tmp")
    save_file(tensors, str(tmp))
    _sync(tmp)
    os.replace(tmp, state_dir / tensor_file)

    record = {"format": FORMAT, "version": VERSION, "step": step, "tensors": tensor_file,
              "tensor_bytes": (state_dir / tensor_file).stat().st_size,
              "train_config": dataclasses.asdict(tc), "extra": extra}
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    _sync(tmp)
    os.replace(tmp, state_dir / STATE_FILE)
    for old in state_dir.glob("tensors-*.safetensors*"):  # earlier states and half-written ones
        if old.name != tensor_file:
            old.unlink(missing_ok=True)
    return state_dir / STATE_FILE


def _sync(path: Path) -> None:
    """Flush a file to disk before it is renamed into place (so a power cut cannot leave it empty)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def load_state(folder: Path) -> SavedState:
    """Read folder/train_state/; a missing, damaged or old-format state is a one-line UsageError."""
    state_dir = Path(folder) / STATE_DIR
    if not has_state(folder):
        raise UsageError(f"no training state in {folder} to resume", "run without --resume to start training")
    try:
        record = json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8"))
        if record.get("format") != FORMAT or record.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} version {VERSION} file")
        tensor_path = state_dir / record["tensors"]
        if tensor_path.parent != state_dir or tensor_path.stat().st_size != record["tensor_bytes"]:
            raise ValueError(f"{record['tensors']} is missing or not the file state.json was written with")
        tensors = load_file(str(tensor_path))
        params: dict = {}
        for key, value in tensors.items():
            if key.startswith("params/"):
                module, _, name = key[len("params/"):].rpartition("/")
                params.setdefault(module, {})[name] = value
        n_leaves = sum(key.startswith("opt_state/") for key in tensors)
        opt_leaves = [tensors[f"opt_state/{i}"] for i in range(n_leaves)]
        return SavedState(step=int(record["step"]), params=params, opt_leaves=opt_leaves,
                          train_config=TrainConfig.from_dict(record["train_config"]), extra=dict(record["extra"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as err:
        raise UsageError(f"cannot read the training state in {state_dir} ({err})",
                         "the state is damaged; start a new run with another --out") from None


def restore(state: SavedState, optimizer: optax.GradientTransformation):
    """(params, opt_state) as device arrays, the optimiser state rebuilt on a fresh template."""
    params = jax.tree_util.tree_map(jnp.asarray, state.params)
    treedef = jax.tree_util.tree_structure(optimizer.init(params))
    if treedef.num_leaves != len(state.opt_leaves):
        raise UsageError(f"the saved optimiser state has {len(state.opt_leaves)} arrays, this optimiser "
                         f"{treedef.num_leaves}", "the state is damaged or from another version; start a new run")
    opt_state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in state.opt_leaves])
    return params, opt_state
