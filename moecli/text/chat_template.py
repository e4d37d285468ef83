"""Chat templates: turn a list of messages into the exact prompt text a chat model was trained on.

Every chat checkpoint ships a Jinja template (in tokenizer_config.json or chat_template.jinja)
that lays out a conversation with the model's own markers: `[INST] ... [/INST]` for Mistral,
`<|im_start|>user ... <|im_end|>` for Qwen, `<|start_header_id|>` for Llama 3. A prompt that
differs from the training format by a single space or newline can make a model noticeably
worse, so `render_chat` reproduces transformers' `apply_chat_template(tokenize=False)` exactly:
the same sandboxed Jinja environment and options (`trim_blocks`, `lstrip_blocks`, loop controls),
the same helpers (`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text as
is), and the same clean-up of the messages (keys whose value is None are dropped).

The rendered text already contains the special tokens (BOS, turn markers), so encode it with
`add_special_tokens=False`. Base models have no template: `chat_template_for` then returns
`PLAIN_CHAT_TEMPLATE`, a readable "User: ... / Assistant:" layout, whose text is ordinary
text and is encoded with `add_special_tokens=True` (`encode_chat` does all of this).
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moecli.errors import TokenizerError, first_line

#: Fallback for checkpoints without a chat template (base models). Renders e.g.
#: "System: Be brief.\nUser: Hi!\nAssistant: Hello.\nUser: Bye\nAssistant:".
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
#: With the plain template a base model tends to write the user's next turn itself; stop there.
PLAIN_STOP_STRINGS = ("\nUser:",)

_HINT = "the checkpoint's chat template cannot render this conversation; fix the template or use the plain prompt format"


def _raise_exception(message):
    raise TokenizerError(f"chat template error: {' '.join(str(message).split())}",
                         "the template rejected this conversation (for example, roles must alternate user/assistant)")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, >, & and ' for HTML; transformers' does not, and templates rely on it.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` in templates, without exposing the real `dict` type's attributes."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, so templates cannot reach CPython internals."""

    def __init__(*args, **kwargs):  # same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; we just render it."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_Namespace)
    return env.from_string(template)


def _plain(value):
    """A copy built from plain JSON types only, so the sandboxed template cannot reach live objects."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return f"<{type(value).__name__}>"


def _prepare(message: dict) -> dict:
    # Drop None values (APIs send content=None with tool calls; templates would print "None"),
    # and expose reasoning under both names templates read, as transformers does.
    message = {k: v for k, v in _plain(message).items() if v is not None}
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool,
                bos_token: str | None, eos_token: str | None, **extra) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) with a chat template.

    `add_generation_prompt` appends the header that opens the assistant's turn. `extra` becomes
    template variables too (e.g. `tools=[...]`, `enable_thinking=False`, `date_string=...`);
    `tools` and `documents` default to None. A None special token is left undefined, as in
    transformers. Raises TokenizerError for a broken template or one that rejects the messages.
    """
    if not messages:
        raise TokenizerError("cannot render an empty conversation", "add at least one message")
    variables = {"bos_token": bos_token, "eos_token": eos_token}
    variables = {k: v for k, v in variables.items() if v is not None}
    variables.update(tools=None, documents=None)
    variables.update(_plain(extra))
    try:
        compiled = _compile(template)
        return compiled.render(messages=[_prepare(m) for m in messages],
                               add_generation_prompt=add_generation_prompt, **variables)
    except TokenizerError:
        raise
    except jinja2.TemplateSyntaxError as err:
        raise TokenizerError(f"chat template syntax error, line {err.lineno}: {err.message}", _HINT) from None
    except Exception as err:  # anything a (data, not code) template does wrong while rendering
        detail = first_line(err)
        raise TokenizerError(f"chat template failed: {detail}", _HINT) from None


def chat_template_for(tokenizer) -> tuple[str, bool]:
    """The tokenizer's chat template, or (PLAIN_CHAT_TEMPLATE, True) when it has none."""
    template = getattr(tokenizer, "chat_template", None)
    return (template, False) if template else (PLAIN_CHAT_TEMPLATE, True)


def encode_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True, **extra) -> list[int]:
    """Render `messages` for `tokenizer`'s model and return the prompt's token ids."""
    template, is_fallback = chat_template_for(tokenizer)
    text = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                       bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, **extra)
    # A real template writes BOS itself; plain text gets what the tokenizer adds to any text.
    return tokenizer.encode(text, add_special_tokens=is_fallback)
