"""`moe serve`'s answers that the real scheduler gives only under load or failure, through a stub
scheduler (tests/serve_helpers.py): a full queue (429), a crash (500, and the server goes on), a
failed generation (500, or an error event in a stream); a gpt-oss (harmony) reply split into
`reasoning_content` and `content`; and the `moe serve` command's own errors and shutdown."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import httpx
import openai
import pytest

from moecli.text.tokenizer import Tokenizer
from serve_helpers import StubScheduler, serving
from tokenizer_fixtures import make_bpe_tokenizer

TEMPLATE = (Path(__file__).parent / "fixtures" / "templates" / "gpt-oss.jinja").read_text(encoding="utf-8")
HARMONY_SPECIAL = ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                   "<|end|>", "<|message|>", "<|call|>")
REPLY = ("<|channel|>analysis<|message|>The user greets; answer briefly.<|end|>"
         "<|start|>assistant<|channel|>final<|message|>Hello there, friend.")  # <|return|>: the stop id, not sent
MODEL = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=400, eos_token_ids=(), max_position_embeddings=1024))
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = make_bpe_tokenizer(tmp_path_factory.mktemp("harmony"), vocab_size=400, special_tokens=HARMONY_SPECIAL,
                                eos_token="<|return|>", pad_token="<|endoftext|>",
                                tokenizer_class="PreTrainedTokenizerFast", chat_template=TEMPLATE)
    return Tokenizer.from_dir(folder)


def app_for(tok, scheduler):
    from moecli.serve.api import create_app

    return create_app(MODEL, tok, scheduler, "stub")


def error_of(response, status):
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_a_full_queue_is_a_429(tok):
    with serving(app_for(tok, StubScheduler("full"))) as url:
        error = error_of(httpx.post(f"{url}/v1/chat/completions", json=CHAT), 429)
        assert error["code"] == "queue_full" and "busy" in error["message"]
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).completions.create(model="stub", prompt="a")


def test_an_unexpected_exception_is_a_500_and_the_server_goes_on(tok):
    with serving(app_for(tok, StubScheduler("crash"))) as url:
        error = error_of(httpx.post(f"{url}/v1/completions", json={"prompt": "hello"}), 500)
        assert error["type"] == "server_error" and "the stub broke" in error["message"]
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_a_failed_generation_is_a_500_or_an_error_event(tok):
    with serving(app_for(tok, StubScheduler("error", tokens=tuple(tok.encode("Hello", add_special_tokens=False))))) as url:
        error = error_of(httpx.post(f"{url}/v1/completions", json={"prompt": "hello"}), 500)
        assert "device fell over" in error["message"]
        lines = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "stream": True}).text.splitlines()
        events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "device fell over" in json.loads(events[-2])["error"]["message"]
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="device fell over"):
            list(client.completions.create(model="stub", prompt="hello", stream=True))


def test_harmony_reasoning_goes_to_reasoning_content(tok):
    with serving(app_for(tok, StubScheduler("tokens", tokens=tuple(tok.encode(REPLY, add_special_tokens=False))))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        reply = client.chat.completions.create(model="stub", messages=CHAT["messages"], max_tokens=4)
        message = reply.choices[0].message
        assert message.content == "Hello there, friend."
        assert message.reasoning_content == "The user greets; answer briefly."
        chunks = list(client.chat.completions.create(model="stub", messages=CHAT["messages"], stream=True))
        deltas = [c.choices[0].delta for c in chunks]
        assert "".join(d.content or "" for d in deltas) == "Hello there, friend."
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "The user greets; answer briefly."


def test_harmony_requests_stop_at_return_and_call(tok):
    """The stop ids a chat request carries are those `moe chat` stops at: eos and harmony's."""
    seen = []

    class Recording(StubScheduler):
        def submit(self, request):
            seen.append(request)
            return super().submit(request)

    with serving(app_for(tok, Recording("tokens"))) as url:
        assert httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "reasoning_effort": "high"}).status_code == 200
    assert {tok.token_to_id("<|return|>"), tok.token_to_id("<|call|>")} <= set(seen[0].stop_ids)
    assert "Reasoning: high" in tok.decode(seen[0].prompt, skip_special_tokens=False)


def moe(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moecli", *args], capture_output=True, text=True, timeout=60, **kwargs)


@pytest.mark.parametrize("args,message", [
    (["--port", "70000"], "--port must be in 0..65535, got 70000"),
    (["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
    (["--context", "-5"], "the context window must be positive"),
    (["--api-key", " "], "--api-key is empty"),
    (["--template-var", "oops"], "bad --template-var 'oops'"),
])
def test_bad_serve_flags_are_one_line(args, message):
    result = moe("serve", *args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        result = moe("serve", "--port", str(taken.getsockname()[1]))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "cannot listen on 127.0.0.1:" in result.stderr and "another --port" in result.stderr


def test_moe_serve_starts_answers_and_stops_cleanly_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "moecli", "serve", "--port", "0", "--max-batch", "2",
                             "--context", "128"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()  # the one startup line, once it is listening
        found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert found and "moe serve · bardmoe" in line, line + proc.stderr.read()
        url = found.group(0)
        reply = httpx.post(f"{url}/completions", json={"prompt": "To be", "max_tokens": 3, "temperature": 0}, timeout=120)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "moe serve: stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_moe_serve_help_answers_without_importing_jax():
    code = ("import sys\nfrom moecli.cli.main import app\n"
            "try:\n    app(['serve', '--help'], prog_name='moe')\nexcept SystemExit:\n    pass\n"
            "print('jax imported' if 'jax' in sys.modules else 'no jax')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().endswith("no jax") and "--max-batch" in result.stdout, result.stdout + result.stderr
