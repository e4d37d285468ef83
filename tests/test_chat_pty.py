"""`moe chat` end to end in a pseudo-terminal, as a person uses it: prompt_toolkit input, streamed
replies, Ctrl-C in the middle of a reply (the partial reply is kept), Ctrl-C at the prompt,
/save, Ctrl-D to leave, and a reply of several lines shown on several lines."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pexpect
import pytest

from checkpoints import chat_checkpoint


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory.mktemp("pty"), "chatml", max_position_embeddings=4096)


def spawn(*args):
    moe = shutil.which("moe") or f"{sys.executable} -m moecli"
    # The suite's cache folder (conftest.py), whose compiled kernels and programs every run reuses.
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "100",
           "PROMPT_TOOLKIT_NO_CPR": "1"}  # pexpect answers no cursor-position request: don't wait for one
    return pexpect.spawn(f"{moe} chat " + " ".join(map(str, args)), env=env, encoding="utf-8",
                         timeout=120, dimensions=(40, 100))


def test_chat_in_a_terminal_with_ctrl_c(long_context, tmp_path):
    saved = tmp_path / "chat.json"
    # Greedy: this checkpoint's greedy reply runs the full 3000 tokens (no eos), so Ctrl-C lands mid-reply.
    child = spawn("--model", long_context, "--max-tokens", 3000, "--context", 4096, "--temperature", 0)
    try:
        child.expect(">>>")
        child.sendline("tell me a long story")
        child.expect("tell me a long story")
        child.expect(r"(?s).{400}", timeout=120)  # the reply is streaming (the prompt's redraw is shorter)
        child.sendintr()                        # ...Ctrl-C stops it
        child.expect(r"\[interrupted\]")
        child.expect(">>>")
        child.send("half-typed line")
        child.sendintr()                        # Ctrl-C at the prompt clears the line
        child.expect(">>>")
        child.sendline("/set max_tokens 4")
        child.expect(">>>")
        child.sendline("and now?")
        child.expect(">>>")
        child.sendline(f"/save {saved}")
        child.expect("saved to")
        child.expect(">>>")
        child.sendeof()                         # Ctrl-D leaves
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1].get("interrupted") is True and messages[1]["content"]
    assert "half-typed" not in json.dumps(messages)
    assert "interrupted" not in messages[3]


def test_bad_model_gives_one_line_and_exit_code(tmp_path):
    child = spawn("--model", tmp_path / "nothing-here")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus != 0
    assert "error:" in child.before and "Traceback" not in child.before


ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][0-9A-Za-z]|[=>78])")
NEXT_PROMPT = r"\n(?:\x1b\[[0-?]*[ -/]*[@-~])*>>>"  # a fresh prompt at the start of a line: the reply is over


def screen_lines(output: str) -> list[str]:
    """The lines the terminal showed, escape sequences removed: a rough reading of the screen, but
    enough to tell one line from two (rich redraws a live reply with cursor moves, so earlier
    drafts of it are in here too)."""
    return [line.strip() for line in re.split(r"\r\n|\r|\n", ESCAPE.sub("", output))]


def test_a_reply_of_several_lines_keeps_its_lines(tmp_path):
    """The bundled model answers in verse. CommonMark would join a paragraph's lines ("my lord;
    For I am ..."); `moe chat` keeps each line, as Markdown (the default) and as plain text. The
    reply is greedy from the fixed bundled model, read back from /save, so the test knows it."""
    question = "What light through yonder window breaks?"
    child = spawn("--temperature", 0, "--max-tokens", 80)  # the bundled model
    outputs = []
    try:
        child.expect(">>>")
        for i, setup in enumerate(["/set markdown on", "/set markdown off"]):
            child.sendline(setup)
            child.expect(NEXT_PROMPT)
            child.sendline(question)
            child.expect(NEXT_PROMPT, timeout=180)
            outputs.append(child.before)
            child.sendline(f"/save {tmp_path / f'{i}.json'}")
            child.expect("saved to")
            child.expect(NEXT_PROMPT)
            child.sendline("/clear")
            child.expect(NEXT_PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    for i, output in enumerate(outputs):
        messages = json.loads((tmp_path / f"{i}.json").read_text())["messages"]
        reply = messages[-1]["content"]
        lines = [line.strip() for line in reply.splitlines() if line.strip()]
        assert len(lines) >= 3, f"this test needs a reply of several lines; the greedy reply is {reply!r}"
        screen = screen_lines(output)
        for line in lines:
            assert line in screen, (line, screen)
        for line, after in zip(lines, lines[1:]):
            assert not any(f"{line} {after.split()[0]}" in shown for shown in screen), (line, after, screen)
