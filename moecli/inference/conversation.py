"""A chat conversation over one KV cache: the state behind `moe chat`, without any UI.

Each turn renders the whole conversation with the chat template, finds how much of it the cache
already holds (the longest common prefix of token ids) and prefills only the rest — usually just
the new user message, since the previous reply's tokens are already in the cache. When the
conversation outgrows the context window the oldest turns are dropped, with a notice.
Whatever happens during a reply — a stop, Ctrl-C, an exception — the messages so far survive.

Each reply draws fresh randomness: its index in the session is folded into the seed's key
(`sampling.reply_key`). A session started without a seed draws one at random and records it in
its settings, so `/stats` shows it, `/save` writes it and `/load` brings it back: the same seed
and the same messages replay the same replies.

A reasoning model's reply (`moecli.text.reasoning`: gpt-oss's harmony channels, think tags) is
kept as its answer (`content`) and its reasoning (`reasoning`); the chat template renders earlier
turns from the answer alone, as these formats require.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

from moecli.inference.text import GenerationStats, context_full_note, context_window, stream_segments
from moecli.text.chat_template import PLAIN_STOP_STRINGS, chat_template_for, encode_chat
from moecli.inference.engine import Model
from moecli.errors import MoecliError, UsageError
from moecli.inference.decoder import Decoder
from moecli.inference.sampling import SamplingParams
from moecli.text.reasoning import ANSWER, PLAIN, REASONING, ReasoningFormat, Segment, reasoning_format
from moecli.text.tokenizer import Tokenizer

SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "max_tokens": int,
            "seed": int, "repetition_penalty": float}
WARN_AT = 0.8  # warn when the conversation fills this much of the context window


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def chat_reply_format(tokenizer: Tokenizer) -> tuple[ReasoningFormat, tuple[str, ...]]:
    """How a chat reply is read: the checkpoint's reasoning format, and the stop strings the chat
    adds (a checkpoint without a template gets the plain "User:/Assistant:" layout, whose replies
    stop at the next "User:"). Shared by `moe chat` and `moe serve`."""
    _, fallback = chat_template_for(tokenizer)
    return (PLAIN, PLAIN_STOP_STRINGS) if fallback else (reasoning_format(tokenizer), ())


class ChatSession:
    """`params` hold the sampling settings and max_tokens (`max_tokens` here overrides theirs); a
    seed of None is drawn now, once. `context` defaults to the model's maximum up to 4096 tokens;
    more than the model's maximum is capped with a notice on stderr (`text.context_window`)."""

    def __init__(self, model: Model, tokenizer: Tokenizer, params: SamplingParams, max_tokens: int | None = None,
                 context: int | None = None, system: str | None = None, stop: tuple[str, ...] = (),
                 model_id: str = "", revision: str | None = None, notify: Callable[[str], None] = print,
                 template_vars: dict | None = None):
        self.model, self.tokenizer, self.notify = model, tokenizer, notify
        params = params if max_tokens is None else dataclasses.replace(params, max_tokens=max_tokens)
        params.validate()
        self.params = params.seeded()
        self.replies = 0  # replies drawn in this session: the next one's index, folded into its key
        self.model_id, self.revision = model_id, revision
        self.template_vars = template_vars or {}  # extra chat-template variables
        self.system = system
        self.messages: list[dict] = []
        self.format, extra_stops = chat_reply_format(tokenizer)  # how replies mark reasoning
        self.stop = tuple(stop) + extra_stops
        self.decoder = Decoder(model, max_len=context_window(model, context))
        self.decoder.capture_routing = any(model.config.moe_layers)  # for /experts
        self.last_stats = GenerationStats()
        self.reply_span = (0, 0)          # positions of the last reply in the cache
        self.disabled: dict[int, set[int]] = {}

    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    # -- the conversation ------------------------------------------------------------------------
    def full_messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [{k: v for k, v in m.items() if k in ("role", "content", "reasoning")} for m in self.messages]

    def prompt_ids(self) -> list[int]:
        """The conversation's tokens; drops the oldest turns (with a notice) until a reply fits."""
        limit = self.decoder.max_len
        while True:
            ids = encode_chat(self.tokenizer, self.full_messages(), add_generation_prompt=True,
                              **self.template_vars)
            if len(ids) + min(self.max_tokens, 32) <= limit:
                break
            if len(self.messages) <= 1:
                raise UsageError(f"this message is {len(ids)} tokens; the context window is {limit}",
                                 "send a shorter message or start moe chat with a larger --context")
            dropped = self.messages.pop(0)
            while self.messages and self.messages[0]["role"] != "user":
                self.messages.pop(0)
            self.notify(f"context full: dropped the oldest turn ({dropped['role']}: "
                        f"{dropped['content'][:40]!r}...) to make room")
        if len(ids) > WARN_AT * limit:
            self.notify(f"context {100 * len(ids) // limit}% full ({len(ids)}/{limit} tokens); "
                        "older turns will be dropped soon (/clear starts afresh)")
        return ids

    def reply(self, text: str, should_stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """Add the user's message and stream the assistant's answer (`reply_segments` without the
        reasoning)."""
        for kind, piece in self.reply_segments(text, should_stop):
            if kind == ANSWER:
                yield piece

    def reply_segments(self, text: str, should_stop: Callable[[], bool] = lambda: False) -> Iterator[Segment]:
        """Add the user's message and stream the assistant's reply as (REASONING or ANSWER, text)
        segments. The reply is recorded even if the stream is interrupted (marked "interrupted") or
        fails (marked "error")."""
        if not text.strip():
            raise UsageError("empty message", "type something, or /help for the commands")
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self.prompt_ids()
        except MoecliError:
            self.messages.pop()  # the message that did not fit
            raise
        reuse = min(common_prefix(self.decoder.ids, ids), len(ids) - 1)  # feed at least one token
        self.decoder.rewind(reuse)
        pieces, self.last_stats = {ANSWER: [], REASONING: []}, GenerationStats()
        budget = min(self.max_tokens, self.decoder.max_len - len(ids))
        message = {"role": "assistant", "content": ""}
        index, self.replies = self.replies, self.replies + 1
        try:
            for kind, piece in stream_segments(self.decoder, self.tokenizer, ids[reuse:], self.params, self.format,
                                               budget, self.stop, self.last_stats, should_stop, reply=index,
                                               parser=self.format.start(self.tokenizer, ids)):
                pieces[kind].append(piece)
                self.reply_span = (len(ids), self.decoder.pos)
                yield kind, piece
            if self.last_stats.stopped_by == "interrupted":
                message["interrupted"] = True
        except BaseException:
            message["error"] = True
            self.decoder.reset()  # the cache may be mid-update: rebuild it from the messages next turn
            raise
        finally:
            message["content"] = "".join(pieces[ANSWER]).strip()
            if "".join(pieces[REASONING]).strip():
                message["reasoning"] = "".join(pieces[REASONING]).strip()
            self.messages.append(message)
        self.last_stats.reused_tokens = reuse

    def stop_notice(self) -> str | None:
        """What to print under the last reply when it did not end by itself: "[interrupted]", or
        that the context window is full (the next turn drops the oldest turns to make room)."""
        if self.last_stats.stopped_by == "interrupted":
            return "[interrupted]"
        full = context_full_note(self.decoder, self.last_stats)
        return full and f"{full}; the next turn drops the oldest turns (/clear starts afresh)"

    # -- experts ---------------------------------------------------------------------------------
    def last_reply_routing(self) -> tuple[list[int], list]:
        """(token ids, routing) of the last reply."""
        start, end = self.reply_span
        return self.decoder.ids[start:end], self.decoder.routing[start:end]

    def mask(self, spec: str) -> None:
        """Switch an expert off ("LAYER:EXPERT"); effective from the next reply."""
        from moecli.inference.routing import parse_mask

        disabled = {k: set(v) for k, v in self.disabled.items()}
        for layer, experts in parse_mask([spec], self.model.config).items():
            disabled.setdefault(layer, set()).update(experts)
        self.decoder.set_expert_mask(disabled)
        self.disabled = disabled

    def unmask(self, spec: str = "") -> None:
        """Switch one expert ("LAYER:EXPERT") or, with no spec, every expert back on."""
        from moecli.inference.routing import parse_mask

        disabled = {} if not spec else {k: set(v) for k, v in self.disabled.items()}
        for layer, experts in (parse_mask([spec], self.model.config) if spec else {}).items():
            disabled[layer] = disabled.get(layer, set()) - experts
        self.decoder.set_expert_mask({k: v for k, v in disabled.items() if v})
        self.disabled = {k: v for k, v in disabled.items() if v}

    def clear(self) -> None:
        self.messages = []
        self.decoder.reset()

    # -- settings ----------------------------------------------------------------------------------
    def set(self, name: str, value: str) -> None:
        if name not in SETTINGS:
            raise UsageError(f"unknown setting {name!r}", f"settable: {', '.join(SETTINGS)}")
        try:
            parsed = SETTINGS[name](value)
        except ValueError:
            raise UsageError(f"{name} needs a {SETTINGS[name].__name__}, got {value!r}",
                             f"e.g. /set {name} {SETTINGS[name](1)}") from None
        params = dataclasses.replace(self.params, **{name: parsed})
        params.validate()
        self.params = params
        if name == "seed":
            self.replies = 0  # a seed set anew replays as if the session had started with it

    def settings(self) -> dict:
        """Every setting, the seed included (drawn at random when none was given)."""
        return dataclasses.asdict(self.params)

    # -- persistence -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        data = {"model": self.model_id, "revision": self.revision, "system": self.system,
                "messages": self.messages, "settings": self.settings(), "replies": self.replies}
        try:
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
        except OSError as err:
            raise UsageError(f"cannot write {path}: {err.strerror}", "choose another path") from None
        return path

    def load(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise UsageError(f"cannot read {path}: {err.strerror}", "check the path") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UsageError(f"{path} is not a saved chat (invalid JSON)", "load a file written by /save") from None
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
                and isinstance(m.get("content"), str) for m in messages):
            raise UsageError(f"{path} is not a saved chat (no valid messages)", "load a file written by /save")
        settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
        backup = (self.params, self.replies)
        try:
            for name, value in settings.items():
                if name in SETTINGS:
                    self.set(name, str(value))
        except UsageError:
            self.params, self.replies = backup
            raise
        replies = data.get("replies")  # so the next reply draws what it would have drawn before /save
        self.replies = replies if type(replies) is int and replies >= 0 else sum(
            m["role"] == "assistant" for m in messages)
        self.system = data.get("system") if isinstance(data.get("system"), str) else self.system
        self.messages = [m for m in messages if m["role"] != "system"]
        self.reply_span = (0, 0)  # the loaded replies were not generated here: no routing to show
        if data.get("model") and data["model"] != self.model_id:
            self.notify(f"note: this chat was saved with model {data['model']}")
