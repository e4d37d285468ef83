"""What `moe train` shows: a line for every phase, in the order they run, an output that fits 80
columns without cutting a number, batch counts during validation, and a note (not an empty
line) from `moe generate` when a briefly trained model ends its reply at once."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from rich.console import Console
from safetensors.numpy import load_file, save_file
from test_train import TINY_FLAGS, invoke, tiny_data  # noqa: F401 (tiny_data is a fixture)
from typer.testing import CliRunner

from moecli.cli.main import app
from moecli.training import evaluation, progress

#: The lines of a fresh run, in order: what each phase's line starts with.
PHASES = ["moe train: 2 layers", "reading the corpus: 3 works to train on, 1 held out",
          "training the tokenizer (sentencepiece BPE, 400 tokens)", "tokenising: ", "initialising ",
          "compiling the training step (once)", "compiling the validation step", progress.step_header().rstrip(),
          "saving the training state (step 8)", "final validation, capacity routing (factor 1.25): loss ",
          "final validation, dropless routing: loss ", "expert load: ", "writing model.safetensors (float32)"]


def render(*renderables) -> str:
    """What an 80-column terminal shows of `renderables`."""
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    for r in renderables:
        console.print(r)
    return console.export_text()


def assert_fits_80_columns(text: str) -> None:
    assert "…" not in text, text
    assert max(map(len, text.splitlines())) <= 80, text


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):  # noqa: F811 (the fixture imported above)
    out = tmp_path_factory.mktemp("progress") / "run"
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--data", str(tiny_data), *TINY_FLAGS],
                                env={"COLUMNS": "80"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_every_phase_has_a_line_in_the_order_it_runs(run):
    _, output = run
    lines = output.splitlines()
    at = [next((i for i, line in enumerate(lines) if line.startswith(start)), None) for start in PHASES]
    assert None not in at, [p for p, i in zip(PHASES, at) if i is None]
    assert at == sorted(at), output
    # Each phase says how long it took; so may one more, when this machine had to build the kernels.
    untimed = (PHASES[0], PHASES[7], PHASES[11])        # the header, the step log and the table
    timed = [line for line in lines if re.search(r"\(\d+\.\d s\)$", line)]
    assert [line for line in timed if not line.startswith("building the CPU kernels (once per machine)")] == \
        [lines[i] for p, i in zip(PHASES, at) if p not in untimed], timed
    # the step log: a row per validation (--eval-interval 4 of 8 steps), under the header's columns
    rows = [line for line in lines if re.match(r"^ +[48] +\d+\.\d{4} ", line)]
    assert [row.split()[0] for row in rows] == ["4", "8"]
    assert all(len(row) == len(progress.step_header()) for row in rows)
    assert f"chat with it: moe chat -m {run[0]}" in " ".join(output.split())  # (however the line wrapped)
    assert_fits_80_columns(output)


def test_resuming_a_finished_run_compiles_no_training_step(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run[0], out)
    result = invoke("--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert "nothing to train" in result.output and "compiling the training step" not in result.output
    assert "final validation, dropless routing" in result.output and "writing model.safetensors" in result.output


def test_validation_counts_its_batches():
    calls = []

    def eval_step(params, batch):
        return np.float32(batch.shape[0]), np.ones((2, 4), np.float32), np.zeros(2, np.float32)

    result = evaluation.evaluate(eval_step, None, np.zeros((3, 2, 5), np.int32), lambda *c: calls.append(c))
    assert calls == [(1, 3), (2, 3), (3, 3)] and result["loss"] == pytest.approx(6 / 24)

    class Status:  # what rich's console.status returns
        def update(self, text):
            calls.append(text)

    progress.Phase(Status(), "final validation, dropless routing").count(12, 48)
    assert calls[-1] == "final validation, dropless routing: batch 12/48"


def cells(text: str) -> list[list[str]]:
    """The rows of a rendered table that start with a layer number, split into cells."""
    return [line.replace("│", " ").split() for line in text.splitlines() if re.match(r"^ *\d+ +│", line)]


@pytest.mark.parametrize("n_experts", [4, 8, 16, 20, 64])
def test_utilisation_tables_fit_80_columns_with_every_number(n_experts):
    rng = np.random.default_rng(n_experts)
    fractions = rng.dirichlet(np.ones(n_experts), size=3)
    fractions[1] = np.eye(n_experts)[0]                       # the widest cells: 100.0 and 100.0%
    dropped = np.array([0.013, 1.0, 0.37])
    text = render(*evaluation.utilisation_report(fractions, dropped, 1.25))
    assert_fits_80_columns(text)
    rows = cells(text)
    per_table = evaluation.EXPERTS_PER_TABLE
    assert len(rows) == 3 * -(-n_experts // per_table)
    for t, first in enumerate(range(0, n_experts, per_table)):
        for layer in range(3):
            row = rows[3 * t + layer]
            expected = [f"{100 * x:.1f}" for x in fractions[layer, first:first + per_table]]
            drop = [f"{100 * dropped[layer]:.1f}%"] if first == 0 else []
            assert row == [str(layer), *expected, *drop], (row, text)
    dropless = render(*evaluation.utilisation_report(fractions, dropped, 0.0))  # trained dropless: nothing dropped
    assert not re.search(r"\bdrop\b", dropless) and len(cells(dropless)) == len(rows), dropless


def test_loss_table_and_step_log_fit_80_columns():
    summary = {"val_tokens": 196_608, "dropped_fraction": [0.012, 0.5], "val_loss_dropless": 123.4567,
               "val_loss_capacity": 4.0012, "capacity_factor": 1.25, "unigram_loss": 6.3015, "train_loss": 3.9}
    text = render(evaluation.loss_table(summary))
    assert_fits_80_columns(text)
    for number in ("196,608", "123.4567", "4.0012", "6.3015", "3.9000", "25.6% dropped"):
        assert number in text, text
    assert "capacity factor" not in render(evaluation.loss_table({**summary, "capacity_factor": 0.0}))
    row = progress.step_row(2_000_000, 123.4567, 10.5, 1.013, 1234.56, 1.0, 1_234_567, 12345.6)
    assert_fits_80_columns(progress.step_header() + "\n" + row)
    assert row.split() == ["2000000", "123.4567", "10.5000", "1.013", "1234.56", "100.0%", "1,234,567", "12345.6"]


def test_step_bar_fits_80_columns():
    bar = progress.training_bar(Console(width=80, file=open("/dev/null", "w")))  # noqa: SIM115
    bar.add_task("val 48/48", total=20000, completed=19999, loss="7.123", val="7.456", tps="1,234,567")
    text = render(bar.make_tasks_table(bar.tasks))
    assert_fits_80_columns(text)
    for part in ("val 48/48", "19999/20000", "loss 7.123", "val 7.456", "1,234,567 tok/s", "ETA"):
        assert part in text, text


def test_generate_notes_a_reply_that_ends_at_once(run, tmp_path):
    """A copy of the tiny model made to put all its probability on `</s>`: every token embeds to
    one vector v, the layers add nothing, and only the end-of-text row of lm_head is v."""
    model = tmp_path / "ends-at-once"
    shutil.copytree(run[0], model, ignore=shutil.ignore_patterns("train_state"))
    tensors = load_file(str(model / "model.safetensors"))
    v = np.random.default_rng(0).standard_normal(tensors["model.embed_tokens.weight"].shape[1]).astype(np.float32)
    tensors["model.embed_tokens.weight"][:] = v
    for name in tensors:
        if name.endswith(("o_proj.weight", "w2.weight")):
            tensors[name][:] = 0
    tensors["lm_head.weight"][:] = 0
    tensors["lm_head.weight"][2] = 10 * v / np.sqrt(np.mean(v ** 2))
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})

    result = CliRunner().invoke(app, ["generate", "-m", str(model), "-p", "Who's there?"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "the model ended its reply at once" in result.stderr and "train it longer" in result.stderr
