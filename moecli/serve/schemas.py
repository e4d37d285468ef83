"""The request bodies `moe serve` accepts, as pydantic models, and their checks.

The fields follow OpenAI's chat-completions and (legacy) completions APIs. Fields this server does
not implement but clients send with their neutral value (`frequency_penalty: 0`, `n: 1`) are
accepted; a value that would change the answer gets a 400 saying it is unsupported, never a reply
that silently ignores it. Unknown fields are ignored, as OpenAI-compatible servers do (clients
send `user`, `logprobs: false`, ...). Sampling values are checked by the one validator the CLI
uses too (`SamplingParams.validate`), so a bad value reads the same everywhere.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, StrictInt, field_validator

from moecli.errors import UsageError
from moecli.inference.sampling import SamplingParams
from moecli.serve.openai_errors import bad_request

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4  # as OpenAI
TOP_K_LIMIT = 2**31 - 1  # top_k travels as int32; a larger one keeps every token all the same


class Message(BaseModel):
    """One chat message; `content` is a string or OpenAI's list of text parts."""

    model_config = ConfigDict(extra="ignore")
    role: str
    content: Any = None
    name: Optional[str] = None

    @field_validator("role")
    @classmethod
    def known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        return role

    @field_validator("content")
    @classmethod
    def text_content(cls, content: Any) -> str:
        """A string, or [{"type": "text", "text": ...}, ...] (joined); images and the like are not
        something this server's models read."""
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        raise ValueError("must be a string or a list of text parts ({\"type\": \"text\", \"text\": ...}); "
                         f"got {type(content).__name__}" + (" with non-text parts" if isinstance(content, list) else ""))

    def for_template(self) -> dict:
        """The message as the chat template reads it (the bundled model's names speakers by `name`)."""
        message = {"role": ROLES[self.role], "content": self.content}
        return {**message, "name": self.name} if self.name else message


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields chat and completions requests share."""

    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[StrictInt] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[StrictInt] = None
    stop: Union[str, list[str], None] = None
    n: Optional[StrictInt] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    def check_supported(self) -> None:
        """400 for values that would ask for what this server does not do."""
        if self.n not in (None, 1):
            raise bad_request(f"n must be 1 (this server returns one choice per request), got {self.n}", "n")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if value not in (None, 0):
                raise bad_request(f"{name} is not supported (got {value}); use repetition_penalty instead "
                                  "(e.g. 1.1), or leave it at 0", name)
        stops = self.stop_strings()
        if len(stops) > MAX_STOPS:
            raise bad_request(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return tuple(s for s in stops if s)

    def token_limit(self) -> Optional[int]:
        return self.max_tokens

    def sampling(self, room: int) -> SamplingParams:
        """Checked `SamplingParams`: OpenAI's defaults (temperature 1, top_p 1) where a field is
        absent, max_tokens at most `room` (what the context window leaves; by default all of it),
        and a random seed when none is given."""
        limit = self.token_limit()
        params = SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=min(self.top_k or 0, TOP_K_LIMIT), min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed, max_tokens=room if limit is None else limit)
        try:
            params.validate()
        except UsageError as err:
            raise bad_request(str(err), str(err).split()[0], "invalid_value") from None
        return dataclasses.replace(params, max_tokens=min(params.max_tokens, room)).seeded()

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(SamplingRequest):
    messages: list[Message]
    max_completion_tokens: Optional[StrictInt] = None
    reasoning_effort: Optional[str] = None

    @field_validator("messages")
    @classmethod
    def not_empty(cls, messages: list[Message]) -> list[Message]:
        if not messages:
            raise ValueError("must hold at least one message")
        return messages

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]

    def one_prompt(self) -> Union[str, list[int]]:
        """The prompt as text or token ids; a batch of several prompts is refused (n = 1)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise bad_request(f"prompt must be one prompt, got a list of {len(prompt)}; send one request each",
                                  "prompt")
            prompt = prompt[0]
        if not prompt or (isinstance(prompt, str) and not prompt.strip()):
            raise bad_request("the prompt is empty", "prompt")
        return prompt
