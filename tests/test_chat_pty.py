"""`moe chat` end to end in a pseudo-terminal, as a person uses it: prompt_toolkit input, streamed
replies, Ctrl-C in the middle of a reply (the partial reply is kept), Ctrl-C at the prompt,
/save, and Ctrl-D to leave."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pexpect
import pytest

from checkpoints import chat_checkpoint


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory.mktemp("pty"), "chatml", max_position_embeddings=4096)


def spawn(*args, tmp_path):
    moe = shutil.which("moe") or f"{sys.executable} -m moecli"
    env = {**os.environ, "MOECLI_CACHE": str(tmp_path / "cache"), "TERM": "xterm", "COLUMNS": "100"}
    return pexpect.spawn(f"{moe} chat " + " ".join(map(str, args)), env=env, encoding="utf-8",
                         timeout=120, dimensions=(40, 100))


def test_chat_in_a_terminal_with_ctrl_c(long_context, tmp_path):
    saved = tmp_path / "chat.json"
    # Greedy: this checkpoint's greedy reply runs the full 3000 tokens (no eos), so Ctrl-C lands mid-reply.
    child = spawn("--model", long_context, "--max-tokens", 3000, "--context", 4096, "--temperature", 0,
                  tmp_path=tmp_path)
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
    child = spawn("--model", tmp_path / "nothing-here", tmp_path=tmp_path)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus != 0
    assert "error:" in child.before and "Traceback" not in child.before
