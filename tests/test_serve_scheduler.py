"""The serving loop (`moecli.serve.scheduler`) on the bundled model: batching changes no request's tokens
(seeded draws included), traffic compiles no new programs, and cancels, full queues, stop ids, long
prompts, failing consumers and shutdown each end the requests they should and nothing else.
Every family's batched tokens are checked in tests/test_families_features.py."""
from __future__ import annotations

import time

import pytest

from moecli.errors import UsageError
from moecli.hub.bundled import bundled_model
from moecli.inference.decoder import generate_tokens
from moecli.inference.engine import load_model
from moecli.serve.scheduler import QueueFull, Request, Scheduler
from moecli.inference.sampling import SamplingParams
from moecli.text.tokenizer import Tokenizer
from serving import submit

TEXTS = ["ROMEO: what light", "To be, or not to be, that is the question", "KING:",
         "Now is the winter of our discontent made glorious summer by this sun of York", "O", "Good morrow"]


@pytest.fixture(scope="module")
def bard():
    folder = bundled_model()
    model = load_model(folder, dtype="float32")
    return model, [Tokenizer.from_dir(folder).encode(text) for text in TEXTS]


@pytest.fixture
def scheduler(bard):
    scheduler = Scheduler(bard[0], max_batch=4, context=128, prefill_chunk=7).start()
    yield scheduler
    scheduler.close()


def wait_until(condition, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_seeded_and_greedy_requests_batched_get_their_tokens_alone(bard, scheduler):
    """Six requests (more than the 4 rows: two wait in the queue), greedy and seeded sampling mixed:
    each gets what `generate_tokens` gives it alone, seeded draws included (per-row PRNG keys)."""
    model, prompts = bard
    sampled = dict(temperature=0.9, top_p=0.95, top_k=40, seed=5)
    settings = [{} if i % 2 else sampled for i in range(len(prompts))]
    alone = [generate_tokens(model, p, max_new_tokens=10, **s) for p, s in zip(prompts, settings)]
    outs = [submit(scheduler, p, 10, **s)[0] for p, s in zip(prompts, settings)]
    assert [out.wait().tokens for out in outs] == alone
    assert all(out.done.completion_tokens == 10 and out.done.reason == "length" for out in outs)
    assert [out.done.prompt_tokens for out in outs] == [len(p) for p in prompts]


def test_requests_coming_and_going_compile_nothing_new(bard):
    """Decode steps run on 1, 2, 4 or 6 rows (buckets): once `precompile` has compiled each, traffic
    of any shape (arriving together and apart, leaving unevenly, over and under each bucket) compiles
    nothing, and the tokens are still each request's alone."""
    model, prompts = bard
    scheduler = Scheduler(model, max_batch=6, context=128, prefill_chunk=7).precompile()
    compiled = scheduler.stats()["compiled_programs"]
    assert compiled >= 4 * 4
    scheduler.start()
    try:
        for wave in (prompts[:1], prompts[:3], prompts, prompts[2:4]):
            outs = [submit(scheduler, p, 3 + 2 * i)[0] for i, p in enumerate(wave)]
            assert [out.wait().tokens for out in outs] == [
                generate_tokens(model, p, max_new_tokens=3 + 2 * i) for i, p in enumerate(wave)]
        assert scheduler.stats()["compiled_programs"] == compiled
    finally:
        scheduler.close()


def test_a_cancelled_request_frees_its_row_and_the_others_go_on(bard, scheduler):
    model, prompts = bard
    gone, handle = submit(scheduler, prompts[0], 100)
    stays, _ = submit(scheduler, prompts[1], 12)
    assert gone.first.wait(60)
    handle.cancel()
    assert gone.wait().done.reason == "cancelled" and len(gone.tokens) < 100
    assert stays.wait().tokens == generate_tokens(model, prompts[1], max_new_tokens=12)
    wait_until(lambda: scheduler.stats()["active"] == 0)


def test_a_stop_id_ends_the_request_without_it(bard, scheduler):
    model, prompts = bard
    greedy = generate_tokens(model, prompts[3], max_new_tokens=12)
    stop = greedy[4]
    out = submit(scheduler, prompts[3], 12, stop_ids=(stop,))[0].wait()
    assert out.done.reason == "stop" and out.tokens == greedy[:greedy.index(stop)]


def test_the_queue_is_bounded(bard):
    """With every row busy and max_queue requests waiting, the next is refused (the server's 429)."""
    model, prompts = bard
    scheduler = Scheduler(model, max_batch=1, context=128, max_queue=1).start()
    try:
        first, _ = submit(scheduler, prompts[0], 40)
        second, _ = submit(scheduler, prompts[1], 2)
        with pytest.raises(QueueFull):
            submit(scheduler, prompts[2], 2)
        assert first.wait().done.reason == "length" and second.wait().done.reason == "length"
        assert submit(scheduler, prompts[2], 2)[0].wait().done.reason == "length"  # room again
    finally:
        scheduler.close()


def test_bad_requests_are_refused_at_submit(bard, scheduler):
    _, prompts = bard
    with pytest.raises(UsageError, match="context is 128"):
        submit(scheduler, prompts[0] * 40)
    with pytest.raises(UsageError, match="empty"):
        submit(scheduler, [])
    with pytest.raises(UsageError, match="temperature"):
        submit(scheduler, prompts[0], temperature=-1)


def test_a_failing_consumer_loses_its_request_only(bard, scheduler):
    model, prompts = bard

    def broken(event):
        raise RuntimeError("the client's socket is gone")

    scheduler.submit(Request(prompts[0], SamplingParams(max_tokens=50), broken))
    out = submit(scheduler, prompts[1], 10)[0].wait()
    assert out.tokens == generate_tokens(model, prompts[1], max_new_tokens=10)
    wait_until(lambda: scheduler.stats()["active"] == 0)


def test_a_continuing_request_reuses_the_cached_prefix(bard, scheduler):
    model, prompts = bard
    first = submit(scheduler, prompts[1], 6)[0].wait()
    follow = prompts[1] + first.tokens + prompts[4]
    out = submit(scheduler, follow, 6)[0].wait()
    assert out.done.cached_tokens == len(prompts[1]) + 5
    assert out.tokens == generate_tokens(model, follow, max_new_tokens=6)
    assert scheduler.stats()["prefix_cache"]["reused_tokens"] >= len(prompts[1]) + 5


def test_closing_cancels_what_is_running(bard):
    model, prompts = bard
    scheduler = Scheduler(model, max_batch=2, context=128).start()
    running, _ = submit(scheduler, prompts[0], 120)
    assert running.first.wait(60)
    scheduler.close()
    assert running.wait(10).done.reason == "cancelled"
    with pytest.raises(UsageError, match="shutting down"):
        submit(scheduler, prompts[0])
