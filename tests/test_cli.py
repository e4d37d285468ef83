"""`moe generate` and `moe chat` through Typer's CliRunner, checked against transformers; and
the command line itself: help, --version, one-line usage errors, a start without JAX."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import transformers
from typer.testing import CliRunner

from checkpoints import chat_checkpoint
from hf_models import hf_greedy
from moecli.cli.main import app
from moecli.text.tokenizer import Tokenizer

runner = CliRunner()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory.mktemp("plain"), "plain")


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory.mktemp("chatml"), "chatml")


def moe(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def expected_greedy_text(folder, prompt: str, n: int, chat: bool = False) -> str:
    """What transformers' greedy decoding writes, cut at the first eos."""
    tok = Tokenizer.from_dir(folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if chat:
        from moecli.text.chat_template import encode_chat
        ids = encode_chat(tok, [{"role": "user", "content": prompt}])
    else:
        ids = tok.encode(prompt)
    out = hf_greedy(hf, ids, n)
    for i, t in enumerate(out):
        if t in tok.eos_ids:
            out = out[:i]
            break
    return tok.decode(out)


def test_generate_greedy_matches_transformers(plain):
    result = moe("generate", "--model", plain, "--prompt", "the water", "--temperature", 0, "--max-tokens", 12)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected_greedy_text(plain, "the water", 12) + "\n"


def test_generate_uses_chat_template(chatml):
    result = moe("generate", "--model", chatml, "--prompt", "hello", "--temperature", 0, "--max-tokens", 10)
    assert result.exit_code == 0, result.output
    assert result.stdout == expected_greedy_text(chatml, "hello", 10, chat=True) + "\n"
    raw = moe("generate", "--model", chatml, "--prompt", "hello", "--temperature", 0, "--max-tokens", 10,
              "--no-chat-template")
    assert raw.stdout == expected_greedy_text(chatml, "hello", 10) + "\n"


def test_prompt_from_stdin_and_verbose_stats(plain):
    result = moe("generate", "--model", plain, "--prompt", "-", "--temperature", 0, "--max-tokens", 6, "--verbose",
                 input="the water")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(expected_greedy_text(plain, "the water", 6))
    for word in ("prompt:", "tok/s", "time to first token", "compile", "peak memory", "CPU kernels: "):
        assert word in result.stderr


def test_stop_string_is_not_printed(plain):
    full = expected_greedy_text(plain, "the water", 12)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    result = moe("generate", "--model", plain, "--prompt", "the water", "--temperature", 0, "--max-tokens", 12,
                 "--stop", stop)
    assert result.stdout == full[:full.index(stop)] + "\n"


def test_same_seed_same_sample(plain):
    args = ["generate", "--model", plain, "--prompt", "the water", "--temperature", 1.0, "--max-tokens", 16]
    a, b = moe(*args, "--seed", 3), moe(*args, "--seed", 3)
    c = moe(*args, "--seed", 4)
    assert a.stdout == b.stdout and a.stdout != c.stdout


@pytest.mark.parametrize("flag,value,message", [
    ("--temperature", -1, "temperature"), ("--top-p", 0, "top_p"), ("--top-p", 1.5, "top_p"),
    ("--top-k", -2, "top_k"), ("--min-p", 2, "min_p"), ("--max-tokens", 0, "max-tokens")])
def test_bad_sampling_flags_give_one_line(plain, flag, value, message):
    result = moe("generate", "--model", plain, "--prompt", "hi", flag, value)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr and "Traceback" not in result.output


def test_empty_prompt_is_an_error(plain):
    result = moe("generate", "--model", plain, "--prompt", "  ")
    assert result.exit_code == 2 and "empty" in result.stderr


def test_chat_session_commands(chatml, tmp_path):
    saved = tmp_path / "chat.json"
    script = "\n".join(["hello", "/set temperature 0", "/set max_tokens 8", "how are you", "/stats",
                        f"/save {saved}", "/bogus", "/set top_p 7", "/set colour red", "/exit"]) + "\n"
    result = moe("chat", "--model", chatml, "--max-tokens", 5, input=script)
    assert result.exit_code == 0, result.output
    assert "unknown command /bogus" in result.stderr
    assert "top_p must be in (0, 1]" in result.stderr and "unknown setting 'colour'" in result.stderr
    data = json.loads(saved.read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
    assert data["settings"]["temperature"] == 0.0 and data["settings"]["max_tokens"] == 8
    assert data["model"] == str(chatml)
    # the second turn reused the first turn's tokens from the KV cache
    reused = [line for line in result.stdout.splitlines() if "reused" in line][0]
    assert int(reused.split("/")[-1]) > 0


def test_chat_markdown_setting(chatml):
    result = moe("chat", "--model", chatml, "--no-markdown", input="/stats\n/set markdown maybe\n/set markdown on\n"
                 "/set colour red\n/stats\n")
    assert result.exit_code == 0, result.output
    assert "markdown is on or off, got 'maybe'" in result.stderr
    assert "unknown setting 'colour'" in result.stderr and "markdown" in result.stderr.splitlines()[-1]
    assert "markdown = on" in result.stdout
    stats_rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["markdown"]]
    assert [row[-1] for row in stats_rows if "=" not in row] == ["off", "on"]


def test_chat_save_to_unwritable_path_keeps_session(chatml, tmp_path):
    script = "hello\n/save /nonexistent/dir/chat.json\n/load /nonexistent.json\n/stats\n"
    result = moe("chat", "--model", chatml, "--max-tokens", 3, input=script)
    assert result.exit_code == 0
    assert "cannot write" in result.stderr and "cannot read" in result.stderr
    assert "generated tokens" in result.stdout  # /stats still ran after the errors


@pytest.mark.parametrize("args,message", [
    (["generate", "--prompt", "x", "--temperature", "abc"], "Invalid value for '--temperature'"),
    (["generate", "--bogus"], "No such option: --bogus"),
    (["generate"], "Missing option '--prompt' / '-p' — see `moe generate --help`"),
    (["generate", "-p"], "Option '-p' requires an argument — see `moe generate --help`"),
    (["download"], "Missing argument 'REPO_ID' — see `moe download --help`"),
    (["--bogus"], "No such option: --bogus — see `moe --help`"),
])
def test_command_line_mistakes_are_one_line(args, message):
    """Through the real console entry point (CliRunner bypasses it): click's usage errors too,
    without click's final period before our " — see ..."."""
    result = subprocess.run([sys.executable, "-m", "moecli", *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:") and message in result.stderr
    assert ". —" not in result.stderr and "— see `moe" in result.stderr


def test_version():
    from moecli import __version__

    result = subprocess.run([sys.executable, "-m", "moecli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == f"moe {__version__}\n" and __version__ == "0.1.0"


@pytest.mark.parametrize("args", [[], ["--help"], ["--version"], ["generate", "--help"], ["chat", "--bogus"],
                                  ["train", "--help"]])
def test_the_command_line_answers_without_importing_jax(args):
    """`moe --help`, `--version` and argument errors answer at once: JAX (seconds to import) and
    the model load only inside the commands that run them. Importing the app must not import it."""
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print('jax imported' if 'jax' in sys.modules else 'no jax'))\n"
            "from moecli.cli.main import app\n"
            "assert 'jax' not in sys.modules, 'importing the app imported jax'\n"
            f"app({args!r}, prog_name='moe')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("no jax"), result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def help_text(*args: str) -> str:
    """`moe ... --help` as one line of words, without the panels' borders (their wrapping varies)."""
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.stdout).split())


@pytest.mark.parametrize("command", ["", "generate", "chat", "download", "info", "bench", "train"])
def test_help_shows_flags_without_a_type_and_defaults_in_full(command):
    text = help_text(*([command] if command else []))
    assert "<bool>" not in text  # a flag takes no value
    assert not re.search(r" [.,;](\s|$)", text)  # "[default: ...]" in a help text is shown, not eaten as markup
    assert "--help Show this message and exit." in text


def test_help_texts_read_as_written():
    assert "--debug Show full tracebacks on errors." in help_text()
    assert "--version Print the version and exit." in help_text()
    generate = help_text("generate")
    assert "Checkpoint folder or Hub repo id [default: the bundled model]." in generate
    assert "--verbose -v Print timing" in generate and "--show-routing Show the reply" in generate
    assert "[default: the last MoE layer]" in generate
    assert "--markdown --no-markdown Show replies as Markdown" in help_text("chat")
    assert "Usage: moe download [OPTIONS] {REPO_ID}" in help_text("download")


def test_too_many_devices_says_how_many_there_are(plain, monkeypatch):
    import jax

    from moecli.checkpoints.families import load_config
    from moecli.errors import ResourceError
    from moecli.model import sharding

    monkeypatch.setattr(sharding.jax, "devices", lambda: jax.local_devices()[:1])
    with pytest.raises(ResourceError, match="asked for 2 devices but only 1 is available"):
        sharding.make_mesh(load_config(plain), 2)
