"""The decoding loop: static shapes (a new prompt or chat turn compiles nothing beyond its length
bucket), the persistent compilation cache, and the text API over it: honest speed figures, the
seed, and the context window's limit."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from checkpoints import chat_checkpoint
from moecli import load_model
from moecli.cli.main import app
from moecli.inference.text import (GenerationStats, context_full_note, decoder_for, generate, load, speed,
                                   stream_tokens_as_text)
from moecli.inference.decoder import Decoder, bucket
from moecli.inference.sampling import SamplingParams


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory.mktemp("plain"), "plain")


def test_buckets():
    assert [bucket(n, 1 << 20) for n in (1, 15, 16, 17, 100, 128, 129)] == [16, 16, 16, 32, 128, 128, 256]
    assert bucket(100, 40) == 40  # never past the room left in the cache


def test_new_prompts_and_turns_reuse_compiled_steps(folder):
    decoder = Decoder(load_model(folder, dtype="float32"), max_len=256)
    greedy = SamplingParams()
    for prompt in ([5, 6, 7], list(range(3, 13)), list(range(3, 20))):   # buckets 16, 16, 32
        decoder.reset()
        list(decoder.tokens(prompt, greedy, max_new_tokens=4))
    assert sorted(decoder._compiled) == [("decode", 1), ("prefill", 16), ("prefill", 32), ("sample", 1)]
    before = dict(decoder._compiled)
    for turn in ([8, 9], [10, 11, 12, 13]):                              # chat turns: bucket 16 again
        list(decoder.tokens(turn, greedy, max_new_tokens=3))
    assert decoder._compiled == before


def test_decoder_cache_holds_every_yielded_token(folder):
    decoder = Decoder(load_model(folder, dtype="float32"), max_len=64)
    out = list(decoder.tokens([5, 6, 7], SamplingParams(), max_new_tokens=6))
    assert decoder.ids == [5, 6, 7] + out and decoder.pos == 9


def test_first_token_comes_before_the_decode_step_compiles(folder):
    """A fresh decoder shows its first token before compiling the decode step; stopping right
    there leaves that token out of the cache, and `ids`/`pos` say so, so a chat that continues
    simply prefills it. Asking for the next token puts it in the cache as usual."""
    model, greedy = load_model(folder, dtype="float32"), SamplingParams()
    want = list(Decoder(model, max_len=64).tokens([5, 6, 7], greedy, max_new_tokens=4))

    decoder = Decoder(model, max_len=64)
    stream = decoder.tokens([5, 6, 7], greedy, max_new_tokens=4)
    assert next(stream) == want[0]
    assert ("decode", 1) not in decoder._compiled and decoder.ids == [5, 6, 7] and decoder.pos == 3
    stream.close()                                                # the consumer stops reading here
    assert list(decoder.tokens([want[0]], greedy, max_new_tokens=3)) == want[1:]   # continues exactly
    assert decoder.ids == [5, 6, 7] + want and decoder.pos == 7

    decoder = Decoder(model, max_len=64)                          # reading on: cached as usual
    stream = decoder.tokens([5, 6, 7], greedy, max_new_tokens=4)
    assert [next(stream), next(stream)] == want[:2] and decoder.ids[:5] == [5, 6, 7] + want[:2]


def test_generate_api_matches_generate_tokens(folder):
    from moecli import generate_tokens

    model, tok = load(folder, dtype="float32")
    ids = generate_tokens(model, tok.encode("the water"), max_new_tokens=8, stop_ids=tuple(tok.eos_ids))
    ids = [i for i in ids if i not in tok.eos_ids]
    assert generate(model, tok, "the water", max_tokens=8, temperature=0.0) == tok.decode(ids)


def test_persistent_compilation_cache_is_written(folder, tmp_path):
    env = {**os.environ, "MOECLI_CACHE": str(tmp_path)}
    env.pop("MOECLI_NO_COMPILE_CACHE", None)
    cmd = [sys.executable, "-m", "moecli", "generate", "--model", str(folder), "--prompt", "hi", "--max-tokens", "2"]
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    entries = list((tmp_path / "jax").iterdir())
    assert len(entries) >= 3  # prefill, sample and decode programs, ready for the next launch


def test_generate_api_is_deterministic_by_default(folder):
    """The Python API keeps seed=0 by default: the same call, the same text, even when sampling."""
    model, tok = load(folder, dtype="float32")
    a, b = (generate(model, tok, "the water", max_tokens=12, temperature=1.0) for _ in range(2))
    assert a == b and a != generate(model, tok, "the water", max_tokens=12, temperature=1.0, seed=1)


# -- speed figures ----------------------------------------------------------------------------------

def test_a_reply_too_short_to_time_says_so():
    assert GenerationStats(generated_tokens=1, decode_s=0.5).decode_tok_s is None     # one token
    assert GenerationStats(generated_tokens=9, decode_s=0.0).decode_tok_s is None     # no decode time
    assert GenerationStats(prompt_tokens=5, prefill_s=0.0).prefill_tok_s is None
    assert speed(GenerationStats(generated_tokens=1).decode_tok_s) == "too short to time"
    timed = GenerationStats(prompt_tokens=8, prefill_s=0.5, generated_tokens=11, decode_s=2.0)
    assert (timed.prefill_tok_s, timed.decode_tok_s) == (16.0, 5.0) and speed(timed.decode_tok_s) == "5.0 tok/s"


class SlowToCompile:
    """A jitted step whose compiling takes `delay` seconds longer, as a big model's does."""

    def __init__(self, jitted, delay: float):
        self.jitted, self.delay = jitted, delay

    def lower(self, *args):
        time.sleep(self.delay)
        return self.jitted.lower(*args)


def test_compile_time_never_enters_the_speeds(folder):
    """On a fresh decoder the prefill compiles before the first token and the decode step after
    it, inside the decode window: both are reported as compile time, and kept out of the speeds."""
    model, tok = load(folder, dtype="float32")
    decoder = Decoder(model, max_len=64)
    decoder._jitted["prefill"] = SlowToCompile(decoder._jitted["prefill"], 1.0)
    decoder._jitted["decode"] = SlowToCompile(decoder._jitted["decode"], 1.5)
    stats = GenerationStats()
    list(stream_tokens_as_text(decoder, tok, tok.encode("the water"), SamplingParams(max_tokens=8), stats=stats))
    assert stats.generated_tokens == 8 and stats.stopped_by == "max tokens"
    assert stats.compile_s >= 2.5 and stats.ttft_s >= 1.0   # the time to first token is wall time
    assert stats.prefill_s < 1.0 and stats.decode_s < 1.5   # the speeds' times hold no compiling
    assert stats.decode_tok_s > 7 / 1.5


# -- the context window -----------------------------------------------------------------------------

def test_a_context_above_the_models_maximum_is_capped_with_a_notice(folder, capsys):
    model = load_model(folder, dtype="float32")
    most = model.config.max_position_embeddings
    decoder = decoder_for(model, 3, 8, context=100000)
    assert decoder.max_len <= most
    assert capsys.readouterr().err == (f"note: --context 100000 is above the model's maximum of {most} "
                                       f"positions; using {most}\n")
    decoder_for(model, 3, 8)                     # no --context: the model's maximum, silently
    decoder_for(model, 3, 8, context=most)
    assert capsys.readouterr().err == ""


def test_a_reply_that_fills_the_context_says_so(folder):
    model, tok = load(folder, dtype="float32")
    ids = tok.encode("the water")
    decoder = decoder_for(model, len(ids), 40, context=len(ids) + 6)
    stats = GenerationStats()
    list(stream_tokens_as_text(decoder, tok, ids, SamplingParams(max_tokens=40), stats=stats))
    assert stats.stopped_by == "context full"
    note = context_full_note(decoder, stats)
    assert f"context window ({len(ids) + 6} tokens) is full" in note and "--context" in note
    assert context_full_note(decoder, GenerationStats(stopped_by="max tokens")) is None


def moe(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_moe_generate_notes_a_full_context_and_a_capped_one_on_stderr(folder):
    result = moe("generate", "--model", folder, "--prompt", "the water", "--temperature", 0,
                 "--max-tokens", 40, "--context", 9)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() and "context window (9 tokens) is full" in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("note: ")
    result = moe("generate", "--model", folder, "--prompt", "the water", "--temperature", 0,
                 "--max-tokens", 2, "--context", 100000)
    assert result.exit_code == 0 and "--context 100000 is above the model's maximum" in result.stderr


def test_moe_generate_is_random_unless_seeded_and_verbose_shows_the_seed(folder):
    args = ["generate", "--model", folder, "--prompt", "the water", "--temperature", 1.0, "--max-tokens", 16,
            "--verbose"]
    runs = [moe(*args) for _ in range(2)]
    seeds = [int(re.search(r"seed: (\d+)", run.stderr).group(1)) for run in runs]
    assert seeds[0] != seeds[1] and runs[0].stdout != runs[1].stdout
    replay = moe(*args, "--seed", seeds[0])
    assert replay.stdout == runs[0].stdout and f"seed: {seeds[0]}" in replay.stderr


def test_precompile_in_a_background_thread_leaves_nothing_for_the_first_reply(folder):
    """`moe chat` compiles the decode step and the first prompt buckets while the user types: the
    first reply then compiles nothing, and its tokens are those of a decoder that compiled on demand."""
    import threading

    model = load_model(folder, dtype="float32")
    warm, cold = Decoder(model, max_len=128), Decoder(model, max_len=128)
    thread = threading.Thread(target=warm.precompile, args=((16, 32),))
    thread.start()
    thread.join()
    assert warm.compiled("decode") and warm.compiled("prefill", 16) and warm.compiled("prefill", 32)
    assert not warm.compiled("prefill", 64)
    before = warm.compile_s
    prompt, params = list(range(3, 23)), SamplingParams(max_tokens=6)   # 20 tokens: the 32 bucket
    assert list(warm.tokens(prompt, params)) == list(cold.tokens(prompt, params))
    assert warm.compile_s == before and cold.compile_s > 0
