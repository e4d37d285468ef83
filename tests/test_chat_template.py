"""moecli.text.chat_template against transformers' apply_chat_template, on real-world templates."""
from __future__ import annotations

from pathlib import Path

import pytest

from moecli.text.chat_template import (
    PLAIN_CHAT_TEMPLATE, chat_template_for, encode_chat, render_chat,
)
from moecli.errors import TokenizerError
from moecli.text.tokenizer import Tokenizer
from tokenizer_fixtures import LLAMA3_SPECIAL, make_bpe_tokenizer, make_sentencepiece_tokenizer

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"

SYSTEM = {"role": "system", "content": "You are terse. Réponds en français si besoin."}
TURNS = [
    {"role": "user", "content": "Hi! What is a mixture of experts? 😀"},
    {"role": "assistant", "content": "  A router sends each token to a few expert MLPs.  "},
    {"role": "user", "content": "And top-2 means?\n\nExplain briefly."},
]
CONVERSATIONS = {"one-turn": TURNS[:1], "multi-turn": TURNS, "system": [SYSTEM, *TURNS]}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Météo du jour <b>& co</b>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

# (template file, tokenizer fixture) -> conversations the template accepts. Mistral templates run
# on both a sentencepiece tokenizer.model and a tokenizer.json with the same <s>, </s> tokens.
ALL = ["one-turn", "multi-turn", "system"]
CASES = {
    ("mistral-instruct.jinja", "sp"): ALL[:2],
    ("mistral-instruct.jinja", "mistral"): ALL[:2],
    ("mixtral-instruct-system.jinja", "sp"): ALL,
    ("mixtral-instruct-system.jinja", "mistral"): ALL,
    ("qwen2.5-instruct.jinja", "chatml"): ALL,
    ("llama-3-instruct.jinja", "llama3"): ALL,
    ("llama-3.2-instruct.jinja", "llama3"): ALL,
}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """fixture name -> (moecli Tokenizer, transformers tokenizer). transformers (and protobuf, for
    tokenizer.model) are test extras: a fixture either of them cannot load is a failure, not a skip."""
    import transformers

    root = tmp_path_factory.mktemp("tok")
    dirs = {
        "sp": make_sentencepiece_tokenizer(root / "sp"),
        "chatml": make_bpe_tokenizer(root / "chatml"),
        "llama3": make_bpe_tokenizer(root / "llama3", special_tokens=LLAMA3_SPECIAL, bos_token="<|begin_of_text|>",
                                     eos_token="<|eot_id|>", pad_token=None, tokenizer_class="PreTrainedTokenizerFast"),
        "mistral": make_bpe_tokenizer(root / "mistral", special_tokens=("<unk>", "<s>", "</s>"), bos_token="<s>",
                                      eos_token="</s>", pad_token=None, tokenizer_class="PreTrainedTokenizerFast"),
    }
    return {name: (Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path)))
            for name, path in dirs.items()}


def pair(tokenizers, name):
    return tokenizers[name]


def hf_ids(ref, template, messages, **kwargs):
    out = ref.apply_chat_template(messages, chat_template=template, tokenize=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("filename, fixture", sorted(CASES))
def test_render_matches_transformers(tokenizers, filename, fixture, add_generation_prompt):
    conversations = CASES[filename, fixture]
    ours, ref = pair(tokenizers, fixture)
    template = (TEMPLATES / filename).read_text(encoding="utf-8")
    for name in conversations:
        messages = CONVERSATIONS[name]
        expected = ref.apply_chat_template(messages, chat_template=template, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
        got = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                          bos_token=ours.bos_token, eos_token=ours.eos_token)
        assert got == expected, (filename, name)
        # transformers tokenizes the rendered text without adding special tokens.
        ids = hf_ids(ref, template, messages, add_generation_prompt=add_generation_prompt)
        assert ours.encode(got, add_special_tokens=False) == ids, (filename, name)


def test_tokenizer_template_is_used(tokenizers):
    ours, ref = pair(tokenizers, "chatml")
    ours.chat_template = ref.chat_template = (TEMPLATES / "qwen2.5-instruct.jinja").read_text()
    assert chat_template_for(ours) == (ours.chat_template, False)
    ids = encode_chat(ours, TURNS, add_generation_prompt=True)
    assert ids == hf_ids(ref, None, TURNS, add_generation_prompt=True)
    assert ids[0] == ours.token_to_id("<|im_start|>")


@pytest.mark.parametrize("filename, fixture", [("qwen2.5-instruct.jinja", "chatml"),
                                               ("llama-3.2-instruct.jinja", "llama3")])
def test_tools_and_tojson_match_transformers(tokenizers, filename, fixture):
    ours, ref = pair(tokenizers, fixture)
    template = (TEMPLATES / filename).read_text(encoding="utf-8")
    messages = [*TURNS[:1], {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": "22 °C"}]
    if fixture == "llama3":
        messages = TURNS[:1]
    expected = ref.apply_chat_template(messages, chat_template=template, tools=TOOLS, tokenize=False,
                                       add_generation_prompt=True)
    got = render_chat(template, messages, add_generation_prompt=True, bos_token=ours.bos_token,
                      eos_token=ours.eos_token, tools=TOOLS)
    assert got == expected
    assert "Météo du jour <b>& co</b>" in got  # tojson keeps non-ASCII and does not HTML-escape


def test_extra_variables_and_none_bos(tokenizers):
    ours, ref = pair(tokenizers, "chatml")
    assert ours.bos_token is None
    template = "[{{ bos_token is defined }}|{{ tools }}|{{ date_string }}|{{ strftime_now('%Y') | length }}]"
    expected = ref.apply_chat_template(TURNS, chat_template=template, tokenize=False, date_string="1 Jan")
    assert render_chat(template, TURNS, add_generation_prompt=False, bos_token=None, eos_token=ours.eos_token,
                       date_string="1 Jan") == expected == "[False|None|1 Jan|4]"


def test_raise_exception_gives_tokenizer_error():
    template = (TEMPLATES / "mistral-instruct.jinja").read_text()
    with pytest.raises(TokenizerError, match="Conversation roles must alternate") as err:
        render_chat(template, [TURNS[0], TURNS[0]], add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert err.value.hint
    with pytest.raises(TokenizerError, match="Only user and assistant roles"):
        render_chat(template, [TURNS[0], {"role": "tool", "content": "42"}], add_generation_prompt=True,
                    bos_token="<s>", eos_token="</s>")
    with pytest.raises(TokenizerError, match="must alternate"):  # Mistral v0.1 has no system role
        render_chat(template, [SYSTEM, *TURNS], add_generation_prompt=True, bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("template, match", [
    ("{% for m in messages %}{{ m.content }", "syntax error"),
    ("{{ messages[0].content + 1 }}", "chat template failed"),
    ("{{ messages.__class__.__mro__ }}", "chat template failed"),  # the sandbox refuses
    ("{% set ns = namespace(_x=1) %}", "chat template failed"),
])
def test_template_errors_are_one_line(template, match):
    with pytest.raises(TokenizerError, match=match) as err:
        render_chat(template, TURNS, add_generation_prompt=False, bos_token="", eos_token="")
    assert "\n" not in str(err.value)


def test_empty_conversation():
    with pytest.raises(TokenizerError):
        render_chat(PLAIN_CHAT_TEMPLATE, [], add_generation_prompt=True, bos_token="", eos_token="")


def test_plain_fallback(tmp_path):
    tok = Tokenizer.from_dir(make_sentencepiece_tokenizer(tmp_path))
    assert tok.chat_template is None
    template, is_fallback = chat_template_for(tok)
    assert (template, is_fallback) == (PLAIN_CHAT_TEMPLATE, True)
    text = render_chat(template, [SYSTEM, *TURNS], add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert text == (f"System: {SYSTEM['content']}\n"
                    "User: Hi! What is a mixture of experts? 😀\n"
                    "Assistant: A router sends each token to a few expert MLPs.\n"
                    "User: And top-2 means?\n\nExplain briefly.\n"
                    "Assistant:")
    assert not render_chat(template, TURNS[:1], add_generation_prompt=False, bos_token="",
                           eos_token="").endswith("Assistant:")
    # Plain text gets the tokenizer's usual BOS; a real template writes its own.
    assert encode_chat(tok, TURNS[:1]) == tok.encode("User: Hi! What is a mixture of experts? 😀\nAssistant:")
    assert encode_chat(tok, TURNS[:1])[0] == tok.bos_id
