"""Training: the router losses, `moe train` end to end on a tiny model (export parity with
transformers, exact resume after an interruption, the pickle-free state and its errors), the
command line generated from TrainConfig, and the bundled model `weights/bardmoe`."""
from __future__ import annotations

import ast
import json
import pickle
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from typer.testing import CliRunner

from moecli import load_model
from moecli.cli.main import app
from moecli.text.chat_template import render_chat
from moecli.text.tokenizer import Tokenizer
from moecli.training import data
from moecli.training import state as state_mod
from moecli.training import train as train_mod
from moecli.training.config import FIELDS

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "weights" / "bardmoe"
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
    saved = state_mod.load_state(tiny_run)
    assert saved.step == 8 and saved.train_config.steps == 8 and saved.train_config.held_out == ("macbeth",)
    assert [p.suffix for p in (tiny_run / "train_state").glob("tensors-*")] == [".safetensors"]  # the old one went
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

    def no_unpickling(*args, **kwargs):
        raise AssertionError("moecli must never unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, no_unpickling)

    def interrupt_at_5(tokens, step, *args):
        if step == 5:
            raise KeyboardInterrupt
        return real(tokens, step, *args)

    monkeypatch.setattr(train_mod, "sample_batch", interrupt_at_5)
    result = invoke("--out", out, "--data", tiny_data, *TINY_FLAGS)
    assert result.exit_code == 130
    assert state_mod.load_state(out).step == 5
    monkeypatch.setattr(train_mod, "sample_batch", real)

    again = invoke("--out", out, "--data", tiny_data, *TINY_FLAGS)
    assert again.exit_code == 2 and "--resume" in again.output  # will not overwrite a run

    resumed = invoke("--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from step 5" in resumed.output
    state, straight = state_mod.load_state(out), state_mod.load_state(tiny_run)
    assert state.step == 8 and state.train_config == straight.train_config
    assert jax.tree_util.tree_structure(state.params) == jax.tree_util.tree_structure(straight.params)
    for a, b in zip(jax.tree_util.tree_leaves((state.params, state.opt_leaves)),
                    jax.tree_util.tree_leaves((straight.params, straight.opt_leaves))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_train_flags_are_checked(tmp_path, tiny_data):
    result = invoke("--out", tmp_path / "x", "--data", tiny_data, "--held-out", "othello")
    assert result.exit_code == 2 and "held-out work 'othello'" in result.output
    result = invoke("--out", tmp_path / "y", "--top-k", "9")
    assert result.exit_code == 2 and "top-k" in result.output
    result = invoke("--out", tmp_path / "z", "--resume")
    assert result.exit_code == 2 and "no training state" in result.output


def saved_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A folder holding a copy of the tiny run's train_state/ (enough for --resume to read it)."""
    shutil.copytree(tiny_run / "train_state", tmp_path / "run" / "train_state")
    return tmp_path / "run"


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_resume_refuses_to_change_the_saved_model(tiny_run, tmp_path):
    out = saved_copy(tiny_run, tmp_path)
    line = one_error_line(invoke("--out", out, "--resume", "--d-model", "64", "--steps", "20"))
    assert "--d-model cannot change when resuming" in line and "--steps" in line
    assert state_mod.load_state(out).step == 8  # nothing was trained


def test_damaged_or_old_format_state_is_one_error_line(tiny_run, tmp_path):
    out = saved_copy(tiny_run, tmp_path)
    tensors = next((out / "train_state").glob("tensors-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-100])
    assert "cannot read the training state" in one_error_line(invoke("--out", out, "--resume"))
    (out / "train_state" / "state.json").write_text("{not json")
    assert "damaged" in one_error_line(invoke("--out", out, "--resume"))

    old = tmp_path / "old"
    (old / "train_state").mkdir(parents=True)
    (old / "train_state" / "state.pkl").write_bytes(pickle.dumps({"step": 1}))
    for args in (["--resume"], ["--steps", "1"]):  # neither resumed nor overwritten
        line = one_error_line(invoke("--out", old, *args))
        assert "old-format training state" in line and "no longer reads" in line and "new run" in line


# ----------------------------------------------------------------------------- the command line

def test_help_lists_every_setting_with_its_flag_and_default():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
    assert result.exit_code == 0, result.output
    rows, flag = {}, None  # flag -> its row of the options panel, wrapped lines joined
    for line in result.output.splitlines():
        words = line.strip("│ *").split()
        if words and words[0].startswith("--"):
            flag, rows[words[0]] = words[0], ""
        if flag and words:
            rows[flag] += " " + " ".join(words)
    flagged = [f for f in FIELDS.values() if f.metadata.get("flag")]
    assert len(flagged) == len(FIELDS) - 1  # every setting but rope_theta is a flag
    for field in flagged:
        row = rows[field.metadata["flag"]]
        assert field.metadata["help"][:30] in row
        if field.default is not None:
            shown = field.metadata.get("show", str)(field.default)
            assert f"[default: {shown}]" in row, row
    assert set(rows) == {f.metadata["flag"] for f in flagged} | {"--out", "--resume", "--help"}
    assert "<bool>" not in rows["--resume"] and "[required]" in rows["--out"]


def test_no_module_of_moecli_uses_pickle():
    unpicklers = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
    for path in (ROOT / "moecli").rglob("*.py"):
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                imported = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not imported & unpicklers, f"{path} imports {imported & unpicklers}"
        assert not re.search(r"allow_pickle\s*=\s*True|pickle\.loads?\(|torch\.load\(", source), path


def imports_of(path: Path, package: str) -> set[str]:
    """The moecli modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return {name for name in found if name.startswith(package + ".")}


def test_training_modules_import_no_module_that_imports_them_back():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (ROOT / "moecli").rglob("*.py")}
    graph = {name: imports_of(path, "moecli") & set(modules) for name, path in modules.items()}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    for name in modules:
        if name.startswith("moecli.training."):
            assert name not in reachable(name), f"{name} imports itself back through {graph[name]}"


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
