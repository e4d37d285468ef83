"""gpt-oss's harmony format (and think tags) through moecli.text.reasoning, the chat and `moe generate`.

The tokenizer is a tiny byte-level BPE with gpt-oss's special tokens (o200k_harmony's names) and
the real gpt-oss chat template (tests/fixtures/templates/gpt-oss.jinja, openai/gpt-oss-20b's
chat_template.jinja). Replies are scripted: a fake decoder yields the token ids of a harmony reply
(and garbage after it, which only a missing stop token would let through), so what the parser,
the chat history and the CLI make of a reply is checked exactly, without a trained model.
"""
from __future__ import annotations

import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moecli.inference import conversation, text as text_api
from moecli.inference.conversation import ChatSession
from moecli.inference.sampling import SamplingParams
from moecli.text.chat_template import encode_chat, render_chat
from moecli.text.reasoning import (ANSWER, PLAIN, REASONING, HarmonyParser, ReasoningFormat, ThinkParser,
                                   reasoning_format, split_stream)
from moecli.text.tokenizer import Tokenizer
from tokenizer_fixtures import make_bpe_tokenizer, write_generation_config

TEMPLATE = (Path(__file__).parent / "fixtures" / "templates" / "gpt-oss.jinja").read_text(encoding="utf-8")
HARMONY_SPECIAL = ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                   "<|end|>", "<|message|>", "<|call|>")
REPLY = ("<|channel|>analysis<|message|>The user greets; answer briefly.<|end|>"
         "<|start|>assistant<|channel|>final<|message|>Hello there, friend.<|return|>")
TOOL_CALL = ("<|channel|>analysis<|message|>Need the weather tool.<|end|>"
             "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
             '<|message|>{"city": "Paris"}<|call|>')
GARBAGE = "GARBAGE after the stop token"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = make_bpe_tokenizer(tmp_path_factory.mktemp("harmony"), vocab_size=400, special_tokens=HARMONY_SPECIAL,
                                eos_token="<|return|>", pad_token="<|endoftext|>",
                                tokenizer_class="PreTrainedTokenizerFast", chat_template=TEMPLATE)
    tok = Tokenizer.from_dir(folder)
    # gpt-oss's generation_config.json: <|return|> and <|endoftext|> end a document; <|call|> is not listed.
    write_generation_config(folder, eos_token_id=[tok.token_to_id("<|return|>"), tok.token_to_id("<|endoftext|>")])
    return Tokenizer.from_dir(folder)


def merged(segments) -> list[tuple[str, str]]:
    out: list[list[str]] = []
    for kind, text in segments:
        if out and out[-1][0] == kind:
            out[-1][1] += text
        else:
            out.append([kind, text])
    return [tuple(s) for s in out]


def parse(parser, pieces) -> list[tuple[str, str]]:
    return merged(split_stream(pieces, parser))


def primed(tok, messages=None, **variables):
    ids = encode_chat(tok, messages or [{"role": "user", "content": "Hi"}], **variables)
    return reasoning_format(tok).start(tok, ids)


# -- the format and its stop tokens --------------------------------------------------------------
def test_harmony_is_detected_with_its_stop_tokens(tok):
    fmt = reasoning_format(tok)
    assert fmt.name == "harmony" and fmt.keep_special
    assert set(fmt.stop_ids) == {tok.token_to_id("<|return|>"), tok.token_to_id("<|call|>")}
    assert tok.token_to_id("<|end|>") not in fmt.stop_ids  # it only ends the analysis message
    assert tok.token_to_id("<|call|>") not in tok.eos_ids  # so the format must add it


def test_other_tokenizers_are_plain_or_think(tmp_path):
    chatml = Tokenizer.from_dir(make_bpe_tokenizer(tmp_path / "a", vocab_size=300, chat_template="{{ messages }}"))
    assert reasoning_format(chatml) is PLAIN
    qwen3 = Tokenizer.from_dir(make_bpe_tokenizer(tmp_path / "b", vocab_size=300,
                                                  chat_template="{{ messages }}<think>\n\n</think>"))
    assert reasoning_format(qwen3).name == "think" and reasoning_format(qwen3).stop_ids == ()


# -- the parser, on streams split at awkward points -------------------------------------------------
EXPECTED = [(REASONING, "The user greets; answer briefly."), (ANSWER, "Hello there, friend.")]


def test_whole_reply_and_every_split_in_two_and_three(tok):
    assert parse(primed(tok), [REPLY]) == EXPECTED
    for i in range(len(REPLY)):
        assert parse(primed(tok), [REPLY[:i], REPLY[i:]]) == EXPECTED, i
    for i in range(0, len(REPLY), 3):
        for j in range(i, len(REPLY), 5):
            assert parse(primed(tok), [REPLY[:i], REPLY[i:j], REPLY[j:]]) == EXPECTED, (i, j)


def test_character_by_character_and_token_by_token(tok):
    assert parse(primed(tok), list(REPLY)) == EXPECTED
    detok = tok.incremental_decoder(skip_special_tokens=False)  # what the stream does for harmony
    ids = tok.encode(REPLY, add_special_tokens=False)
    assert len(ids) > 30 and "analysis" not in [tok.decode([i], False) for i in ids]  # the channel name is split
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert parse(primed(tok), pieces) == EXPECTED


def test_answer_streams_before_the_reply_ends(tok):
    parser = primed(tok)
    assert parser.push("<|channel|>analysis<|mess") == []  # a header, and half a marker: nothing yet
    assert parser.push("age|>Hm") == [(REASONING, "Hm")]
    assert parser.push("m.<|e") == [(REASONING, "m.")]
    assert parser.push("nd|><|start|>assistant<|channel|>fin") == []
    assert parser.push("al<|message|>Yes") == [(ANSWER, "Yes")]


def test_a_tool_call_is_not_the_answer(tok):
    assert parse(primed(tok), list(TOOL_CALL)) == [(REASONING, 'Need the weather tool.\n{"city": "Paris"}')]


def test_several_analysis_messages_and_a_prefilled_final_header(tok):
    two = "<|channel|>analysis<|message|>One.<|end|><|start|>assistant<|channel|>analysis<|message|> Two.<|end|>" \
          "<|start|>assistant<|channel|>final<|message|>Done."
    assert parse(primed(tok), [two]) == [(REASONING, "One.\nTwo."), (ANSWER, "Done.")]
    parser = reasoning_format(tok).start(tok, tok.encode("<|start|>assistant<|channel|>final<|message|>", False))
    assert parse(parser, ["Straight", " to it."]) == [(ANSWER, "Straight to it.")]


def test_a_model_that_ignores_the_format_is_shown_as_the_answer(tok):
    assert parse(primed(tok), ["hello", " world"]) == [(ANSWER, "hello world")]
    parser = primed(tok)
    long = "word " * 60  # past the header limit: shown while it streams, not only at the end
    assert merged(parser.push(long)) == [(ANSWER, long)]
    assert parse(primed(tok), ["<|channel|>analy"]) == []  # a header cut short is no text


def test_think_tags_split_anywhere():
    reply = "<think>\nLet me see.\n</think>\n\nIt is 4."
    for i in range(len(reply)):
        assert parse(ThinkParser(), [reply[:i], reply[i:]]) == [(REASONING, "Let me see.\n"), (ANSWER, "It is 4.")]
    r1_prompt = types.SimpleNamespace(decode=lambda ids, skip_special_tokens: "<|Assistant|><think>\n")
    r1 = ReasoningFormat("think", ThinkParser).start(r1_prompt, [1])  # DeepSeek-R1: the reply starts inside
    assert parse(r1, list("2+2</think>4")) == [(REASONING, "2+2"), (ANSWER, "4")]
    assert parse(HarmonyParser(), ["no markers at all"]) == [(ANSWER, "no markers at all")]


# -- the history ----------------------------------------------------------------------------------
HISTORY = [{"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "Hello there, friend.", "reasoning": "The user greets; answer briefly."},
           {"role": "user", "content": "What is 2+2?"}]


def test_rendering_drops_earlier_reasoning_as_transformers_does(tok):
    import transformers

    ours = render_chat(TEMPLATE, HISTORY, add_generation_prompt=True, bos_token=None, eos_token=None)
    assert "The user greets" not in ours
    assert "<|start|>assistant<|channel|>final<|message|>Hello there, friend.<|end|>" in ours
    assert ours.endswith("<|start|>user<|message|>What is 2+2?<|end|><|start|>assistant")
    ref = transformers.AutoTokenizer.from_pretrained(str(tok.folder))
    hf = [{("thinking" if k == "reasoning" else k): v for k, v in m.items()} for m in HISTORY]
    assert ours == ref.apply_chat_template(hf, tokenize=False, add_generation_prompt=True)
    # The template reads the reasoning where it keeps it (a last assistant turn, for training):
    # moecli's `reasoning` reaches it as `thinking`.
    last = render_chat(TEMPLATE, HISTORY[:2], add_generation_prompt=False, bos_token=None, eos_token=None)
    assert last.endswith("<|start|>assistant<|channel|>analysis<|message|>The user greets; answer briefly.<|end|>"
                         "<|start|>assistant<|channel|>final<|message|>Hello there, friend.<|return|>")
    assert last == ref.apply_chat_template(hf[:2], tokenize=False)


def test_reasoning_effort_reaches_the_system_message(tok):
    ids = encode_chat(tok, HISTORY[:1], reasoning_effort="high")
    assert "Reasoning: high" in tok.decode(ids, skip_special_tokens=False)
    assert "Reasoning: medium" in tok.decode(encode_chat(tok, HISTORY[:1]), skip_special_tokens=False)


# -- a scripted model -----------------------------------------------------------------------------
class FakeDecoder:
    """Decoder's interface over scripted replies: reply i yields script[i]'s token ids, stopping
    after a stop id as the real one does (the garbage after it shows if a stop is missing)."""

    def __init__(self, model, max_len, script):
        self.model, self.max_len, self.script = model, max_len, script
        self.ids, self.compile_s, self.capture_routing, self.routing = [], 0.0, False, []
        self.prompts, self.stop_ids = [], ()

    @property
    def pos(self):
        return len(self.ids)

    def tokens(self, prompt, params, max_new_tokens=None, stop_ids=(), reply=0):
        self.ids += list(prompt)
        self.prompts.append(list(self.ids))
        self.stop_ids = stop_ids
        for token in self.script[reply % len(self.script)][:max_new_tokens or params.max_tokens]:
            self.ids.append(token)
            yield token
            if token in stop_ids:
                return

    def rewind(self, pos):
        self.ids = self.ids[:pos]

    def reset(self):
        self.ids = []

    def set_expert_mask(self, disabled):
        pass

    def precompile(self, sizes=()):
        pass


MODEL = types.SimpleNamespace(config=types.SimpleNamespace(moe_layers=[False, True], n_experts=4, eos_token_ids=[],
                                                           max_position_embeddings=4096))


def script(tok, *replies):
    return [tok.encode(r + GARBAGE, add_special_tokens=False) for r in replies]


@pytest.fixture
def scripted(tok, monkeypatch):
    """Replace the decoder with a FakeDecoder playing `replies`; returns the decoders made."""
    made = []

    def install(*replies):
        def fake(model, max_len, *args, **kwargs):
            made.append(FakeDecoder(model, max_len, script(tok, *replies)))
            return made[-1]
        monkeypatch.setattr(conversation, "Decoder", fake)
        monkeypatch.setattr(text_api, "decoder_for", lambda model, n, max_tokens, context=None: fake(model, 4096))
        monkeypatch.setattr(text_api, "load", lambda *a, **k: (MODEL, tok))
        return made
    return install


def test_chat_keeps_answer_and_reasoning_apart_and_drops_old_reasoning(tok, scripted):
    made = scripted(REPLY, "<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant<|channel|>final"
                           "<|message|>4.<|return|>")
    chat = ChatSession(MODEL, tok, SamplingParams(temperature=0.0), max_tokens=200, notify=print)
    assert merged(chat.reply_segments("Hi")) == EXPECTED
    assert chat.messages[-1] == {"role": "assistant", "content": "Hello there, friend.",
                                 "reasoning": "The user greets; answer briefly."}
    assert "".join(chat.reply("What is 2+2?")) == "4."  # reply(): the answer alone
    decoder = made[0]
    assert set(decoder.stop_ids) >= {tok.token_to_id("<|return|>"), tok.token_to_id("<|call|>")}
    second = tok.decode(decoder.prompts[1], skip_special_tokens=False)
    assert "The user greets" not in second and "Hello there, friend.<|end|>" in second
    assert decoder.prompts[1] == encode_chat(tok, HISTORY)  # the cache holds exactly the re-rendered prompt
    assert chat.last_stats.stopped_by == "eos" and chat.messages[-1]["content"] == "4."


# -- the command line -----------------------------------------------------------------------------
runner = CliRunner()


def moe(*args, input=None):
    from moecli.cli.main import app

    return runner.invoke(app, [str(a) for a in args], input=input)


def test_generate_prints_the_answer_on_stdout_and_the_reasoning_on_stderr(tok, scripted):
    scripted(REPLY)
    shown = moe("generate", "--model", tok.folder, "--prompt", "Hi", "--temperature", 0)
    assert shown.exit_code == 0, shown.output
    assert shown.stdout == "Hello there, friend.\n"
    assert "The user greets; answer briefly." in shown.stderr and GARBAGE not in shown.output
    hidden = moe("generate", "--model", tok.folder, "--prompt", "Hi", "--reasoning", "hide")
    assert hidden.exit_code == 0, hidden.output
    assert hidden.stdout == "Hello there, friend.\n" and "The user greets" not in hidden.stderr


def test_generate_stops_at_a_tool_call_and_sets_the_effort(tok, scripted):
    made = scripted(TOOL_CALL)
    result = moe("generate", "--model", tok.folder, "--prompt", "Weather?", "--reasoning-effort", "high")
    assert result.exit_code == 0, result.output
    assert GARBAGE not in result.output and "Need the weather tool." in result.stderr
    assert "Reasoning: high" in tok.decode(made[-1].prompts[0], skip_special_tokens=False)
    assert "still reasoning" not in result.stderr  # it ended (<|call|>), not ran out of tokens


def test_generate_says_when_the_budget_ends_inside_the_reasoning(tok, scripted):
    scripted(REPLY)
    result = moe("generate", "--model", tok.folder, "--prompt", "Hi", "--max-tokens", 12)
    assert result.exit_code == 0, result.output
    assert result.stdout == "\n" and "still reasoning" in result.stderr


@pytest.mark.parametrize("flag, value, message", [("--reasoning", "loud", "reasoning is show or hide"),
                                                  ("--reasoning-effort", "max", "low, medium or high")])
def test_bad_reasoning_flags_are_one_line(tok, scripted, flag, value, message):
    scripted(REPLY)
    result = moe("generate", "--model", tok.folder, "--prompt", "Hi", flag, value)
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_chat_shows_reasoning_until_set_to_hide(tok, scripted):
    scripted(REPLY)
    result = moe("chat", "--model", tok.folder, "--temperature", 0,
                 input="Hi\n/set reasoning hide\nHi again\n/stats\n/set reasoning_effort low\n/set reasoning_effort x\n")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.count("The user greets; answer briefly.") == 1  # the first reply's, not the second's
    assert out.count("Hello there, friend.") == 2 and GARBAGE not in out
    assert out.index("The user greets") < out.index("Hello there")
    assert "hide (harmony format)" in out and "reasoning_effort = low" in out
    assert "low, medium or high" in result.output


def test_reasoning_is_dimmed_on_a_terminal():
    import io

    from rich.console import Console

    from moecli.cli.reply import stream_reply

    segments = [(REASONING, "Pondering"), (REASONING, " deeply."), (ANSWER, "**Yes**.")]
    for markdown in (True, False):
        out = io.StringIO()
        console = Console(file=out, force_terminal=True, color_system="standard", width=60)
        assert stream_reply(console, iter(segments), markdown=markdown) == "**Yes**."
        assert "\x1b[2mPondering" in out.getvalue(), markdown
        hidden = io.StringIO()
        console = Console(file=hidden, force_terminal=True, color_system="standard", width=60)
        stream_reply(console, iter(segments), markdown=markdown, reasoning=False)
        assert "Pondering" not in hidden.getvalue() and "Yes" in hidden.getvalue()
