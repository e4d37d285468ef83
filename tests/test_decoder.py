"""The decoding loop: static shapes (a new prompt or chat turn compiles nothing beyond its length
bucket), the persistent compilation cache, and the text API over it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from checkpoints import chat_checkpoint
from moecli import load_model
from moecli.inference.text import generate, load
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
