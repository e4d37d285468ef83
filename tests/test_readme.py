"""The README's promises: its test command is what CI runs, its CLI docs match `moe --help`, and
its Python examples run."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moecli.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.+?)\n```", README, re.S)

#: What the README's Python examples leave to the reader, made concrete: placeholder paths become
#: the bundled model, and the token ids they use without defining are its "<s>To be, or not".
PLACEHOLDER_PATHS = {"path/to/checkpoint": str(ROOT / "weights" / "bardmoe")}
FIXTURES = "ids = [[1, 419, 308, 1979, 536, 325]]\nprompt_ids = [1, 419, 308, 1979, 536, 325]\n"


def first_commands() -> list[str]:
    return re.findall(r"```(?:bash|sh)\n(.+?)\n```", README, re.S)[:2]


def test_ci_runs_the_readme_test_command():
    install_and_chat, tests = first_commands()
    assert "moe chat" in install_and_chat
    assert "pytest" in tests
    assert tests.strip() in (ROOT / ".ci" / "run").read_text()


def test_readme_documents_every_command():
    result = CliRunner().invoke(app, ["--help"])
    commands = re.findall(r"^│ (\w+) ", result.stdout, re.M)
    assert {"download", "generate", "chat"} <= set(commands)
    for command in commands:
        assert f"moe {command}" in README, command


def test_the_readme_has_python_examples():
    assert PYTHON_BLOCKS, "no ```python block in README.md"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"block{i}" for i in range(len(PYTHON_BLOCKS))])
def test_readme_python_example_runs(block, monkeypatch, capsys):
    """Every ```python block runs as written (after FIXTURES, with PLACEHOLDER_PATHS filled in),
    from the checkout, whose relative paths ("weights/bardmoe") the README uses; a block that
    prints prints something."""
    for placeholder, path in PLACEHOLDER_PATHS.items():
        block = block.replace(placeholder, path)
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(FIXTURES, "<fixtures>", "exec"), namespace)
    exec(compile(block, "README.md ```python block", "exec"), namespace)
    if "print(" in block:
        assert capsys.readouterr().out.strip()
