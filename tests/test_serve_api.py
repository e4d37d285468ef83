"""`moe serve` end to end: the real `openai` client (and httpx, for what a client library would not
send) against the server on loopback, serving the bundled model through the real scheduler.

Greedy replies are checked token for token against `generate_tokens` (one sequence, no batching,
no server), so the text, the usage counts and the finish reasons are each checked against an
independent reference, not against the server itself."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import httpx
import openai
import pytest

from moecli.inference.decoder import generate_tokens
from moecli.inference.text import stop_token_ids
from moecli.text.chat_template import encode_chat
from serve_helpers import serving

CONTEXT = 256
POEM = "To be, or not to be, that is the question:"
ENDLESS = "Friends"  # greedy, the bundled model does not end this one within 200 tokens


@pytest.fixture(scope="module")
def srv():
    from moecli.hub.bundled import bundled_model
    from moecli.inference.text import load
    from moecli.serve.api import create_app
    from moecli.serve.scheduler import Scheduler

    model, tokenizer = load(bundled_model(), dtype="float32")
    scheduler = Scheduler(model, max_batch=8, context=CONTEXT, max_queue=8, prefill_chunk=64,
                          prefix_cache_mb=16).start()
    try:
        with serving(create_app(model, tokenizer, scheduler, "bardmoe")) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
            yield SimpleNamespace(url=url, scheduler=scheduler, model=model, tokenizer=tokenizer, client=client,
                                  app_args=(model, tokenizer, scheduler))
    finally:
        scheduler.close()


def reference(srv, ids: list[int], max_tokens: int) -> tuple[str, int, str]:
    """Greedy (text, completion tokens, finish reason) from one plain decoder."""
    eos = stop_token_ids(srv.tokenizer, srv.model.config)
    out = generate_tokens(srv.model, ids, max_new_tokens=max_tokens, stop_ids=eos)
    stopped = bool(out) and out[-1] in eos
    out = out[:-1] if stopped else out
    return srv.tokenizer.decode(out), len(out), "stop" if stopped else "length"


def chat_ids(srv, content: str) -> list[int]:
    return encode_chat(srv.tokenizer, [{"role": "user", "content": content}])


def post(srv, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", timeout=120, **kwargs)


def test_models_and_health(srv):
    assert [m.id for m in srv.client.models.list().data] == ["bardmoe"]
    health = httpx.get(f"{srv.url}/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 8 and health["active"] == 0
    missing = httpx.get(f"{srv.url}/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_chat_greedy_matches_one_decoder_streamed_and_not(srv):
    text, n, reason = reference(srv, chat_ids(srv, "Good morrow, sweet lady."), 12)
    messages = [{"role": "user", "content": "Good morrow, sweet lady."}]
    reply = srv.client.chat.completions.create(model="bardmoe", messages=messages, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == text
    assert reply.choices[0].finish_reason == reason
    assert reply.usage.prompt_tokens == len(chat_ids(srv, "Good morrow, sweet lady."))
    assert reply.usage.completion_tokens == n and reply.usage.total_tokens == reply.usage.prompt_tokens + n
    chunks = list(srv.client.chat.completions.create(model="bardmoe", messages=messages, max_completion_tokens=12,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again: its prefix reused


def test_completions_streamed_and_not_and_from_token_ids(srv):
    ids = srv.tokenizer.encode(POEM)
    text, n, reason = reference(srv, ids, 10)
    reply = srv.client.completions.create(model="bardmoe", prompt=POEM, max_tokens=10, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text == text
    assert reply.choices[0].finish_reason == reason
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == n
    streamed = list(srv.client.completions.create(prompt=[ids], max_tokens=10, temperature=0, stream=True,
                                                  model="bardmoe"))
    assert "".join(c.choices[0].text for c in streamed) == text
    assert streamed[-1].choices[0].finish_reason == reason
    no_model = post(srv, "/v1/completions", json={"prompt": ids, "max_tokens": 10, "temperature": 0})
    assert no_model.status_code == 200 and no_model.json()["choices"][0]["text"] == text


def test_stop_strings_cut_the_text_and_finish_with_stop(srv):
    text, _, _ = reference(srv, srv.tokenizer.encode(ENDLESS), 16)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip() and text.find(stop) > 0
    kwargs = dict(model="bardmoe", prompt=ENDLESS, max_tokens=200, temperature=0)
    steps = srv.scheduler.stats()["steps"]
    reply = srv.client.completions.create(stop=[stop, "@@never@@"], **kwargs)
    assert reply.choices[0].text == text[:text.find(stop)] and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens < 16
    assert wait_idle(srv.scheduler, 5) and srv.scheduler.stats()["steps"] - steps < 100  # its row was cancelled
    streamed = list(srv.client.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed) == text[:text.find(stop)]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_a_seed_replays_the_same_sample(srv):
    kwargs = dict(model="bardmoe", prompt=POEM, max_tokens=10, temperature=1.0, top_p=0.95)
    first = srv.client.completions.create(seed=11, **kwargs).choices[0].text
    assert srv.client.completions.create(seed=11, **kwargs).choices[0].text == first
    streamed = srv.client.completions.create(seed=11, stream=True, **kwargs)
    assert "".join(c.choices[0].text for c in streamed) == first
    others = {srv.client.completions.create(seed=s, **kwargs).choices[0].text for s in (1, 2, 3)}
    assert len(others | {first}) > 1  # the seed matters


def test_concurrent_streams_each_get_their_greedy_tokens(srv):
    """8 clients streaming at once (the batch's 8 rows) each get the greedy text of decoding alone."""
    prompts = ["Friends, Romans, countrymen,", "Now is the winter of our discontent", "O Romeo, Romeo!",
               "All the world's a stage,", "If music be the food of love,", "KING:", "Good morrow, cousin.",
               "What light through yonder window breaks?"]
    expected = [reference(srv, srv.tokenizer.encode(p), 10)[0] for p in prompts]
    got, errors = [None] * len(prompts), []

    def ask(i):
        try:
            stream = srv.client.completions.create(model="bardmoe", prompt=prompts[i], max_tokens=10, temperature=0,
                                                   stream=True)
            got[i] = "".join(c.choices[0].text for c in stream)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == [] and got == expected


def wait_idle(scheduler, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if scheduler.stats()["active"] == 0 and scheduler.stats()["queued"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_leaves_mid_stream_frees_its_row(srv):
    assert reference(srv, srv.tokenizer.encode(ENDLESS), 200)[1] == 200  # left alone, it would run 200 steps
    steps = srv.scheduler.stats()["steps"]
    stream = srv.client.completions.create(model="bardmoe", prompt=ENDLESS, max_tokens=200, temperature=0,
                                           stream=True)
    seen = [next(stream), next(stream)]
    assert all(c.choices[0].finish_reason is None for c in seen)  # still generating when we leave
    stream.close()
    assert wait_idle(srv.scheduler, 5), srv.scheduler.stats()
    assert srv.scheduler.stats()["steps"] - steps < 150  # it did not run on to its 200 tokens
    reply = srv.client.completions.create(model="bardmoe", prompt=POEM, max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens >= 1


def test_a_client_that_leaves_before_a_whole_reply_frees_its_row(srv):
    steps = srv.scheduler.stats()["steps"]
    with pytest.raises(httpx.ReadTimeout):  # gives up waiting and closes the connection
        httpx.post(f"{srv.url}/v1/completions", json={"prompt": ENDLESS, "max_tokens": 200, "temperature": 0},
                   timeout=0.2)
    assert wait_idle(srv.scheduler, 5), srv.scheduler.stats()
    assert srv.scheduler.stats()["steps"] - steps < 150


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("body,param,words", [
    ({"messages": []}, "messages", "at least one message"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content", "non-text parts"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "role must be one of"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role", "is required"),
    ({}, "messages", "is required"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature", "temperature must be >= 0"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 2}, "top_p", "top_p must be in (0, 1]"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens", "max_tokens must be positive"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -3}, "seed", "seed must be an integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": "many"}, "top_k", "valid integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n", "n must be 1"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, "max_tokens", "valid integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, "stop", "valid string"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5}, "frequency_penalty",
     "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": -1}, "presence_penalty", "not supported"),
    ({"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "max"}, "reasoning_effort",
     "low, medium or high"),
])
def test_bad_chat_requests_are_400s_that_say_what_is_wrong(srv, body, param, words):
    error = error_of(post(srv, "/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]


def test_malformed_json_unknown_model_and_unknown_route(srv):
    error = error_of(post(srv, "/v1/chat/completions", content=b'{"messages": [',
                          headers={"content-type": "application/json"}), 400)
    assert "not valid JSON" in error["message"]
    assert "valid dictionary" in error_of(post(srv, "/v1/chat/completions", json=[1, 2]), 400)["message"]
    nan = post(srv, "/v1/completions", content=b'{"prompt": "a", "temperature": NaN}',
               headers={"content-type": "application/json"})
    assert error_of(nan, 400)["message"] == "temperature must be >= 0, got nan"
    error = error_of(post(srv, "/v1/completions", json={"model": "gpt-9", "prompt": "hi"}), 404)
    assert error["code"] == "model_not_found" and "bardmoe" in error["message"]
    error_of(post(srv, "/v1/embeddings", json={"input": "hi"}), 404)
    error_of(httpx.get(f"{srv.url}/v1/chat/completions"), 405)
    with pytest.raises(openai.NotFoundError):
        srv.client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def test_prompts_over_the_context_and_other_bad_prompts(srv):
    long_chat = {"messages": [{"role": "user", "content": "Speak, speak! " * 200}], "max_tokens": 4}
    assert error_of(post(srv, "/v1/chat/completions", json=long_chat), 400)["code"] == "context_length_exceeded"
    long_ids = {"prompt": [5] * (CONTEXT + 10), "max_tokens": 4}
    assert error_of(post(srv, "/v1/completions", json=long_ids), 400)["code"] == "context_length_exceeded"
    assert "vocabulary" in error_of(post(srv, "/v1/completions", json={"prompt": [1, 10**9]}), 400)["message"]
    assert "empty" in error_of(post(srv, "/v1/completions", json={"prompt": "  "}), 400)["message"]
    assert "one prompt" in error_of(post(srv, "/v1/completions", json={"prompt": ["a", "b"]}), 400)["message"]
    assert "at most 4" in error_of(post(srv, "/v1/completions", json={"prompt": "a", "stop": list("abcde")}),
                                   400)["message"]
    assert wait_idle(srv.scheduler, 2)  # none of them reached the scheduler, and the server still answers


def test_neutral_unsupported_fields_and_text_parts_are_accepted(srv):
    body = {"messages": [{"role": "system", "content": [{"type": "text", "text": "A garden."}]},
                         {"role": "user", "content": [{"type": "text", "text": "Good "}, {"type": "text", "text": "day."}]}],
            "max_tokens": 2, "n": 1, "frequency_penalty": 0, "presence_penalty": 0.0, "user": "x", "logprobs": False}
    reply = post(srv, "/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    expected = encode_chat(srv.tokenizer, [{"role": "system", "content": "A garden."},
                                           {"role": "user", "content": "Good day."}])
    assert reply.json()["usage"]["prompt_tokens"] == len(expected)


def test_the_api_key_guards_every_endpoint_but_health(srv):
    from moecli.serve.api import create_app

    with serving(create_app(*srv.app_args, "bardmoe", api_key="s3cret")) as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            error = error_of(httpx.get(f"{url}/v1/models", headers=headers), 401)
            assert error["code"] == "invalid_api_key"
            error_of(httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, headers=headers), 401)
        assert httpx.get(f"{url}/health").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0, timeout=120)
        assert client.completions.create(model="bardmoe", prompt=POEM, max_tokens=1, temperature=0).usage.completion_tokens == 1


def test_a_bounded_load_loses_nothing(srv):
    """36 requests from 12 threads, streamed and not, at a server of 2 rows and a queue of 1: each gets
    a whole reply (its finish reason, usage agreeing with the text streamed) or a clear 429, never a
    hang or a broken answer, and afterwards the server is idle and answers as before."""
    from moecli.serve.api import create_app
    from moecli.serve.scheduler import Scheduler

    scheduler = Scheduler(srv.model, max_batch=2, context=CONTEXT, max_queue=1).start()
    outcomes, lock = [], threading.Lock()
    try:
        with serving(create_app(srv.model, srv.tokenizer, scheduler, "bardmoe")) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

            def one(i: int):
                kwargs = dict(model="bardmoe", prompt=POEM[: 10 + i % 20], max_tokens=4 + i % 5, temperature=0)
                try:
                    if i % 2:
                        chunks = list(client.completions.create(stream=True, **kwargs))
                        finish = chunks[-1].choices[0].finish_reason
                        text = "".join(c.choices[0].text for c in chunks)
                        outcome = ("done", finish, len(srv.tokenizer.encode(text)) > 0 or finish == "stop")
                    else:
                        reply = client.completions.create(**kwargs)
                        outcome = ("done", reply.choices[0].finish_reason,
                                   reply.usage.completion_tokens <= kwargs["max_tokens"])
                except openai.RateLimitError as error:
                    outcome = ("429", error.body["message"] if isinstance(error.body, dict) else "", True)
                except Exception as error:  # noqa: BLE001 - any other outcome fails the test
                    outcome = ("broken", repr(error), False)
                with lock:
                    outcomes.append(outcome)

            threads = [threading.Thread(target=lambda t=t: [one(3 * t + k) for k in range(3)]) for t in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            assert len(outcomes) == 36, "a request never finished"
            assert all(kind in ("done", "429") and ok for kind, _, ok in outcomes), outcomes
            assert all(reason in ("stop", "length") for kind, reason, _ in outcomes if kind == "done"), outcomes
            assert any(kind == "429" for kind, _, _ in outcomes) and any(kind == "done" for kind, _, _ in outcomes)
            assert wait_idle(scheduler, 10), scheduler.stats()
            assert client.completions.create(model="bardmoe", prompt=POEM, max_tokens=3).usage.completion_tokens >= 1
    finally:
        scheduler.close()
