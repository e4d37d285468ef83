"""Training: the router losses, `moe train` end to end on a tiny model (export parity with
transformers, exact resume after an interruption), and the bundled model `weights/bardmoe`."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from typer.testing import CliRunner

from moecli import load_model
from moecli.training import data
from moecli.training import train as train_mod
from moecli.cli.main import app
from moecli.text.chat_template import render_chat
from moecli.text.tokenizer import Tokenizer

BUNDLED = Path(__file__).resolve().parent.parent / "weights" / "bardmoe"
TINY_FLAGS = ["--held-out", "macbeth", "--vocab-size", "400", "--layers", "2", "--d-model", "32", "--heads", "4",
              "--kv-heads", "2", "--head-dim", "8", "--experts", "4", "--top-k", "2", "--d-expert", "24",
              "--steps", "8", "--batch-size", "4", "--seq-len", "32", "--warmup", "2", "--eval-interval", "4",
              "--eval-batches", "2", "--checkpoint-interval", "4", "--export-dtype", "float32"]


# ----------------------------------------------------------------------------- router losses

def test_load_balancing_loss_is_one_when_balanced_and_larger_when_skewed():
    layers, tokens, n_experts = 2, 16, 4
    # Balanced: uniform router probabilities and every expert chosen equally often.
    experts = np.stack([np.arange(tokens) % n_experts, (np.arange(tokens) + 1) % n_experts], -1)
    experts = jnp.asarray(np.broadcast_to(experts, (layers, 1, tokens, 2)))
    balanced = train_mod.load_balancing_loss(jnp.zeros((layers, 1, tokens, n_experts)), experts)
    assert float(balanced) == pytest.approx(1.0, abs=1e-6)
    # Skewed: the router prefers expert 0 and every token goes to experts 0 and 1.
    logits = jnp.zeros((layers, 1, tokens, n_experts)).at[..., 0].set(3.0)
    skewed_experts = jnp.broadcast_to(jnp.array([0, 1]), (layers, 1, tokens, 2))
    skewed = train_mod.load_balancing_loss(logits, skewed_experts)
    assert float(skewed) > 1.5
    # Half the layers skewed: the mean over layers.
    mixed = train_mod.load_balancing_loss(jnp.concatenate([logits[:1], jnp.zeros_like(logits[:1])]),
                                          jnp.concatenate([skewed_experts[:1], experts[:1]]))
    assert float(mixed) == pytest.approx((float(skewed) + 1.0) / 2, rel=1e-5)


def test_router_z_loss_and_dropped_fraction():
    assert float(train_mod.router_z_loss(jnp.zeros((1, 1, 3, 8)))) == pytest.approx(np.log(8) ** 2, rel=1e-6)
    # 6 tokens, top-1, all to expert 2, capacity 4: the last 2 of 6 assignments are dropped.
    experts = jnp.full((1, 1, 6, 1), 2)
    assert float(train_mod.dropped_fraction(experts, capacity=4, n_experts=4)[0]) == pytest.approx(2 / 6)


# ----------------------------------------------------------------------------- moe train, tiny

@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A few KB of four works from the bundled archive (one held out)."""
    folder = tmp_path_factory.mktemp("corpus")
    works = data.read_works()
    for name in ("hamlet", "lear", "romeo_and_juliet", "macbeth"):
        (folder / f"{name}_gut.txt").write_text(works[name][:25000], encoding="utf-8")
    return folder


def invoke(*args):
    return CliRunner().invoke(app, ["train", *map(str, args)], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "run"
    result = invoke("--out", out, "--data", tiny_data, *TINY_FLAGS)
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_a_checkpoint_moecli_and_transformers_load(tiny_run):
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["architectures"] == ["MixtralForCausalLM"]
    state = pickle.loads((tiny_run / "train_state" / "state.pkl").read_bytes())
    assert state["step"] == 8
    summary = json.loads((tiny_run / "train_state" / "summary.json").read_text())
    assert np.isfinite(summary["val_loss_dropless"]) and np.isfinite(summary["val_loss_capacity"])

    ours = load_model(tiny_run, dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_run, dtype=torch.float32, attn_implementation="eager")
    ids = np.random.default_rng(0).integers(0, config["vocab_size"], (2, 24))
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(ids)), theirs, atol=1e-4, rtol=0)
    # moecli's stacked experts were written one tensor per expert, under Mixtral's Hub names.
    from safetensors import safe_open
    with safe_open(str(tiny_run / "model.safetensors"), "np") as f:
        names = set(f.keys())
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names


def test_tokenizer_and_chat_template_match_transformers(tiny_run):
    ours = Tokenizer.from_dir(tiny_run)
    hf = transformers.AutoTokenizer.from_pretrained(tiny_run)
    messages = [{"role": "system", "content": "SCENE II. Capulet's orchard."},
                {"role": "user", "content": "But, soft! what light through yonder window breaks?"},
                {"role": "assistant", "content": "Ay me!"},
                {"role": "user", "content": "She speaks.", "name": "Romeo"}]
    text = render_chat(ours.chat_template, messages, add_generation_prompt=True,
                       bos_token=ours.bos_token, eos_token=ours.eos_token)
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("ROMEO.\nShe speaks.\n</s>\nJULIET.\n")
    assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False).input_ids
    assert ours.eos_ids == [2] and ours.bos_id == 1


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_run, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = train_mod.sample_batch

    def interrupt_at_5(tokens, step, *args):
        if step == 5:
            raise KeyboardInterrupt
        return real(tokens, step, *args)

    monkeypatch.setattr(train_mod, "sample_batch", interrupt_at_5)
    result = invoke("--out", out, "--data", tiny_data, *TINY_FLAGS)
    assert result.exit_code == 130
    assert pickle.loads((out / "train_state" / "state.pkl").read_bytes())["step"] == 5
    monkeypatch.setattr(train_mod, "sample_batch", real)

    again = invoke("--out", out, "--data", tiny_data, *TINY_FLAGS)
    assert again.exit_code == 2 and "--resume" in again.output  # will not overwrite a run

    resumed = invoke("--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from step 5" in resumed.output
    state = pickle.loads((out / "train_state" / "state.pkl").read_bytes())
    straight = pickle.loads((tiny_run / "train_state" / "state.pkl").read_bytes())
    assert state["step"] == 8
    for a, b in zip(jax.tree_util.tree_leaves(state["params"]), jax.tree_util.tree_leaves(straight["params"])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_train_flags_are_checked(tmp_path, tiny_data):
    result = invoke("--out", tmp_path / "x", "--data", tiny_data, "--held-out", "othello")
    assert result.exit_code == 2 and "held-out work 'othello'" in result.output
    result = invoke("--out", tmp_path / "y", "--top-k", "9")
    assert result.exit_code == 2 and "top-k" in result.output
    result = invoke("--out", tmp_path / "z", "--resume")
    assert result.exit_code == 2 and "no training state" in result.output


# ----------------------------------------------------------------------------- the corpus

def test_corpus_split_and_play_format():
    works = data.read_works()
    assert len(works) == 41
    train, valid = data.split_works(works)
    assert set(valid) == set(data.HELD_OUT) and not set(train) & set(valid)
    hamlet = data.normalise_work("hamlet", works["hamlet"])
    assert "BERNARDO.\nWho's there?\n</s>\nFRANCISCO.\nNay, answer me" in hamlet
    assert "\nHam.\n" not in hamlet and "\nHAMLET.\nTo be, or not to be" in hamlet
    sonnets = data.normalise_work("sonnets", works["sonnets"])
    assert sonnets.count("</s>") == 1 and sonnets.endswith("</s>")


# ----------------------------------------------------------------------------- the bundled model

@pytest.fixture(scope="module")
def bundled():
    assert (BUNDLED / "model.safetensors").is_file(), "weights/bardmoe is missing"
    return load_model(BUNDLED, dtype="float32"), Tokenizer.from_dir(BUNDLED)


@pytest.fixture(scope="module")
def held_out_tokens(bundled):
    """16 windows of 257 held-out tokens (4,096 targets), spread over the four held-out plays."""
    _, tokenizer = bundled
    train, valid = data.split_works(data.read_works())
    tokens = data.encode(tokenizer, [data.normalise_work(k, v) for k, v in valid.items()])
    train_tokens = data.encode(tokenizer, [data.normalise_work(k, v) for k, v in train.items()])
    return train_mod.eval_windows(tokens, 16, 256, 1)[0], train_tokens


def test_bundled_checkpoint_files():
    files = {p.name for p in BUNDLED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json", "README.md"} <= files
    assert sum(p.stat().st_size for p in BUNDLED.iterdir()) <= 20 * 2 ** 20
    config = json.loads((BUNDLED / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["dtype"] == "bfloat16"


def test_bundled_model_matches_transformers(bundled, held_out_tokens):
    model, _ = bundled
    windows, _ = held_out_tokens
    hf = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED, dtype=torch.float32, attn_implementation="eager")
    ids = windows[:2, :128]
    with torch.no_grad():
        theirs = hf(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), theirs, atol=1e-3, rtol=0)


def test_bundled_model_beats_the_unigram_baseline_in_both_routing_modes(bundled, held_out_tokens):
    model, _ = bundled
    windows, train_tokens = held_out_tokens
    inputs, targets = windows[:, :-1], windows[:, 1:]

    def loss(m):
        logits = m(inputs)
        return float(jnp.mean(train_mod.cross_entropy(logits, jnp.asarray(targets))))

    dropless = loss(model)
    capacity = loss(model.with_config(capacity_factor=1.25))
    unigram = data.unigram_loss(train_tokens, targets.reshape(-1), model.config.vocab_size)
    assert dropless < unigram - 1.5, (dropless, unigram)
    assert abs(capacity - dropless) < 0.05, (capacity, dropless)
