"""The bundled model's 1,024-token context: its config allows it, and moecli and transformers read
that config the same way past the 256 positions it was trained on (bench/context_eval.py measures
that the extension keeps the held-out loss; weights/bardmoe/README.md has the table)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from moecli import load_model
from moecli.checkpoints.families import load_config
from moecli.text.tokenizer import Tokenizer
from moecli.training import data

BUNDLED = Path(__file__).resolve().parent.parent / "weights" / "bardmoe"
TRAINED = 256  # the training sequence length


def test_bundled_config_allows_1024_positions_within_the_measured_window():
    config = json.loads((BUNDLED / "config.json").read_text())
    assert config["max_position_embeddings"] >= 1024
    # The extension measured not to hurt: plain RoPE, attention over at most the trained 256 tokens.
    assert config["rope_parameters"]["rope_type"] == "default"
    assert config["sliding_window"] is not None and config["sliding_window"] <= TRAINED
    ours = load_config(BUNDLED)
    assert (ours.max_position_embeddings, ours.sliding_window) == (config["max_position_embeddings"],
                                                                    config["sliding_window"])


@pytest.fixture(scope="module")
def held_out_ids() -> np.ndarray:
    """[1, 600] held-out tokens: the opening of Macbeth, as `moe train` encodes it."""
    works = data.read_works()
    ids = data.encode(Tokenizer.from_dir(BUNDLED), [data.normalise_work("macbeth", works["macbeth"])])
    return ids[None, :600]


def test_moecli_and_transformers_agree_past_the_training_length(held_out_ids):
    ours = np.asarray(load_model(BUNDLED, dtype="float32")(held_out_ids))
    hf = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32,
                                                           attn_implementation="eager")
    with torch.no_grad():
        theirs = hf(torch.as_tensor(held_out_ids, dtype=torch.long)).logits.numpy()
    assert ours.shape == theirs.shape == (1, 600, hf.config.vocab_size)
    relative = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert relative <= 1e-4, relative
