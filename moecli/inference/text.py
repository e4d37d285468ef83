"""Text in, text out: the public API over the model, tokenizer and decoder.

    from moecli import load, generate, stream_generate
    model, tokenizer = load("weights/bardmoe")          # a folder or a Hub repo id
    print(generate(model, tokenizer, "To be, or not to be", max_tokens=40, temperature=0.7))
    for piece in stream_generate(model, tokenizer, "Friends, Romans,"):
        print(piece, end="", flush=True)

Prompts are raw text (continued as is) or a list of chat messages (rendered with the checkpoint's
chat template). Text streams out piece by piece, never splitting a UTF-8 character, and stops at
an eos id, at a stop string (not printed) or at the token limit.
"""
from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax

from moecli.text.chat_template import encode_chat
from moecli.inference.engine import Model, load_model
from moecli.errors import UsageError
from moecli.inference.decoder import Decoder, bucket
from moecli.runtime import enable_compilation_cache
from moecli.inference.sampling import SamplingParams
from moecli.text.reasoning import (ANSWER, PLAIN, Parser, ReasoningFormat, Segment, partial_suffix,
                                   reasoning_format, split_stream)
from moecli.text.tokenizer import Tokenizer

DEFAULT_CONTEXT = 4096


@dataclasses.dataclass
class GenerationStats:
    """What `moe generate --verbose` and `/stats` report about one generation.

    Compile time is kept apart: `prefill_s` and `decode_s` are the run time left once the
    compiling that happened inside them is taken out (the decode step may compile after the
    first token is shown), so the speeds below never count it."""

    prompt_tokens: int = 0
    reused_tokens: int = 0       # chat: prompt tokens already in the KV cache, not prefilled again
    prefill_s: float = 0.0
    generated_tokens: int = 0
    decode_s: float = 0.0
    ttft_s: float = 0.0          # launch of the request to the first token on the host, compile included
    compile_s: float = 0.0
    stopped_by: str = ""         # eos | stop string | max tokens | context full | interrupted

    @property
    def prefill_tok_s(self) -> float | None:
        """Prompt tokens per second, or None when there was no time to measure."""
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else None

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens per second after the first (the first token is the prefill's), or None for a
        reply too short to time: one token, or no measurable decode time."""
        timed = self.generated_tokens - 1
        return timed / self.decode_s if self.decode_s > 0 and timed > 0 else None


def speed(tok_s: float | None) -> str:
    """A `GenerationStats` speed for people: "12.3 tok/s", or "too short to time" (not 0.0 tok/s)."""
    return "too short to time" if tok_s is None else f"{tok_s:.1f} tok/s"


def peak_memory_mb() -> tuple[float, float | None]:
    """(peak host RSS, peak device memory or None where the backend does not say), in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    host = rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024
    stats = jax.devices()[0].memory_stats() or {}
    device = stats.get("peak_bytes_in_use")
    return host, (device / 2**20 if device is not None else None)


def load(path_or_repo: str | Path, dtype: str = "auto", revision: str | None = None,
         devices: int | None = None, quantize: str | None = None) -> tuple[Model, Tokenizer]:
    """Load a model and its tokenizer from a local folder or a Hub repo id (downloaded if needed);
    `devices` spreads the experts over that many devices; `quantize` ("q8", "q4") quantizes the
    weights as they load (`moecli.model.quant`)."""
    from moecli.hub.download import resolve_model
    from moecli.kernels.cpu import ffi

    enable_compilation_cache()
    folder = resolve_model(str(path_or_repo), revision=revision)
    tokenizer = Tokenizer.from_dir(folder)  # a missing tokenizer fails fast, before the weights load
    if jax.default_backend() == "cpu":  # not before: a bad --model must not wait for the compiler
        ffi.start_building()  # a first launch compiles the kernels while the checkpoint is read
    return load_model(folder, dtype=dtype, devices=devices, quantize=quantize), tokenizer


def prompt_ids(tokenizer: Tokenizer, prompt: str | list[dict] | list[int], chat_template: bool = True,
               template_vars: dict | None = None) -> list[int]:
    """Token ids for raw text, for chat messages rendered with the checkpoint's template (with
    extra template variables, e.g. the bundled model's `user_speaker`), or token ids as they are."""
    if _are_ids(prompt):
        if not prompt:
            raise UsageError("the prompt is empty", "pass some text with --prompt (or - to read stdin)")
        return list(prompt)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UsageError("the prompt is empty", "pass some text with --prompt (or - to read stdin)")
        if chat_template and tokenizer.chat_template:
            return encode_chat(tokenizer, [{"role": "user", "content": prompt}], **(template_vars or {}))
        return tokenizer.encode(prompt)
    return encode_chat(tokenizer, prompt, **(template_vars or {}))


class StopStrings:
    """Holds back streamed text that could be the start of a stop string, and cuts at one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.pending, self.hit = tuple(s for s in stops if s), "", False

    def push(self, text: str) -> str:
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit, out, self.pending = True, self.pending[:cut], ""
            return out
        keep = partial_suffix(self.pending, self.stops)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stop_token_ids(tokenizer: Tokenizer, config, extra: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The token ids that end a reply: the tokenizer's eos ids (else config.json's), then `extra`
    (a reasoning format's, e.g. harmony's `<|return|>` and `<|call|>`). Shared by every decoding
    loop: `stream_tokens_as_text` and `moe serve`'s requests."""
    return (tuple(tokenizer.eos_ids) or tuple(config.eos_token_ids)) + tuple(extra)


def stream_tokens_as_text(decoder: Decoder, tokenizer: Tokenizer, ids: list[int], params: SamplingParams,
                          max_tokens: int | None = None, stop: tuple[str, ...] = (),
                          stats: GenerationStats | None = None, should_stop=lambda: False,
                          reply: int = 0, stop_ids: tuple[int, ...] = (), keep_special: bool = False) -> Iterator[str]:
    """The decoding loop at the text level; shared by `stream_generate` and `moe chat`.

    `should_stop()` is polled between tokens (the chat's Ctrl-C handler sets it), so an
    interruption never lands inside a device call and the cache stays consistent. `reply`
    numbers a chat's replies, for fresh randomness in each (`Decoder.tokens`). `stop_ids` end
    the reply as eos does (harmony's `<|return|>`, `<|call|>`); `keep_special` keeps special
    tokens in the text (harmony's channel markers, for `stream_segments`)."""
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, compiled_before = len(ids), decoder.compile_s
    detok, stops = tokenizer.incremental_decoder(skip_special_tokens=not keep_special), StopStrings(stop)
    eos = stop_token_ids(tokenizer, decoder.model.config, stop_ids)
    start = last = time.perf_counter()
    compiled_by_first = 0.0  # compile time inside the time to first token
    stats.stopped_by = "max tokens"
    for n, token in enumerate(decoder.tokens(ids, params, max_tokens, stop_ids=eos, reply=reply), start=1):
        now = time.perf_counter()
        if n == 1:
            stats.ttft_s, compiled_by_first = now - start, decoder.compile_s - compiled_before
            stats.prefill_s = max(0.0, stats.ttft_s - compiled_by_first)
        stats.generated_tokens, last = n, now
        if token in eos:
            stats.stopped_by = "eos"
            break
        text = stops.push(detok.add(token))
        if text:
            yield text
        if stops.hit:
            stats.stopped_by = "stop string"
            break
        if should_stop():
            stats.stopped_by = "interrupted"
            break
    else:
        if decoder.pos >= decoder.max_len:
            stats.stopped_by = "context full"
    if not stops.hit:
        tail = stops.push(detok.flush()) + ("" if stops.hit else stops.flush())
        if tail:
            yield tail
    stats.compile_s = decoder.compile_s - compiled_before
    compiled_in_decode = stats.compile_s - compiled_by_first  # e.g. the decode step, after token 1
    stats.decode_s = max(0.0, last - start - stats.ttft_s - compiled_in_decode)


def stream_segments(decoder: Decoder, tokenizer: Tokenizer, ids: list[int], params: SamplingParams,
                    fmt: ReasoningFormat = PLAIN, max_tokens: int | None = None, stop: tuple[str, ...] = (),
                    stats: GenerationStats | None = None, should_stop=lambda: False,
                    reply: int = 0, parser: Parser | None = None) -> Iterator[Segment]:
    """`stream_tokens_as_text` split into (REASONING or ANSWER, text) segments by the reply format
    `fmt` (`moecli.text.reasoning`: harmony channels, think tags, or plain: all answer). `parser`
    defaults to `fmt`'s, primed with `ids`: pass one primed with the whole prompt when `ids` are
    only the part the cache does not hold yet."""
    parser = parser or fmt.start(tokenizer, ids)
    pieces = stream_tokens_as_text(decoder, tokenizer, ids, params, max_tokens, stop, stats, should_stop, reply,
                                   stop_ids=fmt.stop_ids, keep_special=fmt.keep_special)
    yield from split_stream(pieces, parser)


def note(text: str) -> None:
    """A one-line notice on stderr, apart from the generated text on stdout."""
    print(f"note: {text}", file=sys.stderr)


def context_window(model: Model, context: int | None = None, notify=note) -> int:
    """The context window to use: `context` tokens, or by default the model's maximum up to
    DEFAULT_CONTEXT. A `context` above the model's maximum is capped, never silently: positions
    past it were never trained (and RoPE tables may end there), so the notice says so."""
    most = model.config.max_position_embeddings
    if context is None:
        return min(DEFAULT_CONTEXT, most)
    if context <= 0:
        raise UsageError(f"the context window must be positive, got {context}", "pass e.g. --context 4096")
    if context > most:
        notify(f"--context {context} is above the model's maximum of {most} positions; using {most}")
        return most
    return context


def context_full_note(decoder: Decoder, stats: GenerationStats) -> str | None:
    """What to say under a reply that stopped because the context window filled up (else None)."""
    if stats.stopped_by != "context full":
        return None
    most = decoder.model.config.max_position_embeddings
    room = (f"pass a larger --context (the model allows {most})" if decoder.max_len < most
            else "the model allows no more")
    return f"the reply stopped because the context window ({decoder.max_len} tokens) is full; {room}"


def decoder_for(model: Model, n_prompt: int, max_tokens: int, context: int | None = None,
                notify=note) -> Decoder:
    """A decoder whose cache fits the prompt and the reply (a bucket, so lengths share programs)."""
    limit = context_window(model, context, notify)
    if n_prompt >= limit:
        raise UsageError(f"the prompt has {n_prompt} tokens but the context window is {limit}",
                         "shorten the prompt (moecli does not truncate it silently)")
    return Decoder(model, max_len=min(limit, bucket(n_prompt + max_tokens, 1 << 30)))


def stream_generate(model: Model, tokenizer: Tokenizer, prompt: str | list[dict] | list[int], *,
                    max_tokens: int = 256, stop: tuple[str, ...] = (), chat_template: bool = True,
                    context: int | None = None, stats: GenerationStats | None = None,
                    decoder: Decoder | None = None, **sampling) -> Iterator[str]:
    """Yield the reply to `prompt` (text, chat messages or token ids) as text pieces. `sampling`:
    temperature, top_p, top_k, min_p, repetition_penalty, seed (`moecli.inference.sampling.SamplingParams`;
    seed=0 by default, so the same call gives the same text; seed=None draws one at random).
    Pass a `decoder` (from `decoder_for`) to capture routing or mask experts on it. A prompt
    rendered with a chat template gets only the answer of a reasoning model's reply
    (`stream_segments` gives the reasoning too)."""
    params = SamplingParams(max_tokens=max_tokens, **sampling)
    params.validate()
    ids = prompt_ids(tokenizer, prompt, chat_template)
    decoder = decoder or decoder_for(model, len(ids), max_tokens, context)
    templated = not _are_ids(prompt) and (not isinstance(prompt, str)
                                          or bool(chat_template and tokenizer.chat_template))
    fmt = reasoning_format(tokenizer) if templated else PLAIN
    for kind, text in stream_segments(decoder, tokenizer, ids, params, fmt, stop=stop, stats=stats):
        if kind == ANSWER:
            yield text


def _are_ids(prompt) -> bool:
    return isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)


def generate(model: Model, tokenizer: Tokenizer, prompt: str | list[dict], **kwargs) -> str:
    """The whole reply to `prompt` as one string (same arguments as `stream_generate`)."""
    return "".join(stream_generate(model, tokenizer, prompt, **kwargs))
