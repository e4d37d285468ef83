"""The README's promises: its test command is what CI runs, and its CLI docs match `moe --help`."""
from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from moecli.cli.main import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


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
