"""ChatSession: KV-cache reuse across turns gives the same replies as re-prefilling everything,
the context window drops old turns visibly, and failures never lose the conversation."""
from __future__ import annotations

import json
import re

import pytest

from checkpoints import chat_checkpoint
from moecli import load_model
from moecli.inference.conversation import ChatSession
from moecli.errors import UsageError
from moecli.inference.sampling import SamplingParams
from moecli.text.tokenizer import Tokenizer

GREEDY = SamplingParams(temperature=0.0)
SAMPLED = SamplingParams(temperature=1.0, seed=None)  # no seed: the session draws one


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    folder = chat_checkpoint(tmp_path_factory.mktemp("chatml"), "chatml")
    return load_model(folder, dtype="float32"), Tokenizer.from_dir(folder)


def session(parts, params=GREEDY, **kw):
    model, tok = parts
    notes = []
    chat = ChatSession(model, tok, params, max_tokens=kw.pop("max_tokens", 8), notify=notes.append, **kw)
    return chat, notes


def talk(chat, messages) -> list[str]:
    return ["".join(chat.reply(m)) for m in messages]


def test_cached_turns_equal_fresh_prefill(parts):
    chat, _ = session(parts)
    first = "".join(chat.reply("hello"))
    second = "".join(chat.reply("and then?"))
    assert chat.last_stats.reused_tokens > 10  # the first turn was not prefilled again

    fresh, _ = session(parts)
    fresh.messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first}]
    assert "".join(fresh.reply("and then?")) == second
    assert fresh.last_stats.reused_tokens == 0


def test_interrupted_reply_is_kept_and_marked(parts):
    chat, _ = session(parts, max_tokens=30)
    calls = {"n": 0}

    def stop_after_three():
        calls["n"] += 1
        return calls["n"] >= 3

    text = "".join(chat.reply("hello", should_stop=stop_after_three))
    assert chat.last_stats.stopped_by == "interrupted"
    assert chat.messages[-1] == {"role": "assistant", "content": text.strip(), "interrupted": True}
    "".join(chat.reply("go on"))  # the conversation continues after the interruption
    assert len(chat.messages) == 4


def test_exception_during_generation_keeps_conversation(parts, monkeypatch):
    chat, _ = session(parts)
    "".join(chat.reply("hello"))

    def boom(*a, **k):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(chat.decoder, "feed", boom)
    with pytest.raises(RuntimeError):
        "".join(chat.reply("again"))
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[-1]["error"] is True
    monkeypatch.undo()
    "".join(chat.reply("once more"))  # the cache was rebuilt from the messages
    assert len(chat.messages) == 6


def test_full_context_drops_oldest_turns_with_notice(parts):
    chat, notes = session(parts, context=160, max_tokens=8)
    for i in range(6):
        "".join(chat.reply(f"message number {i} with some words in it"))
    assert any("dropped the oldest turn" in n for n in notes)
    assert chat.messages[0]["role"] == "user" and "message number 0" not in chat.messages[0]["content"]


def test_message_longer_than_context_is_refused(parts):
    chat, _ = session(parts, context=120)
    with pytest.raises(UsageError, match="context window"):
        "".join(chat.reply("word " * 300))
    assert chat.messages == []


def test_save_and_load_roundtrip(parts, tmp_path):
    chat, _ = session(parts)
    chat.set("temperature", "0.5")
    "".join(chat.reply("hello"))
    path = chat.save(tmp_path / "c.json")
    other, _ = session(parts)
    other.load(path)
    assert other.messages == chat.messages and other.params.temperature == 0.5
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="invalid JSON"):
        other.load(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text(json.dumps({"messages": [{"role": "wizard"}]}))
    with pytest.raises(UsageError, match="no valid messages"):
        other.load(tmp_path / "bad2.json")
    assert other.messages == chat.messages  # a failed load changes nothing


def test_template_variables_reach_the_chat_template():
    """The bundled model's template names the speakers from template variables."""
    from moecli.hub.bundled import bundled_model

    folder = bundled_model()
    model, tok = load_model(folder, dtype="float32"), Tokenizer.from_dir(folder)
    chat = ChatSession(model, tok, GREEDY, max_tokens=4, notify=lambda _: None,
                       template_vars={"user_speaker": "HAMLET", "assistant_speaker": "OPHELIA"})
    "".join(chat.reply("To be, or not to be?"))
    text = tok.decode(chat.decoder.ids, skip_special_tokens=False)
    assert "HAMLET.\nTo be, or not to be?" in text and "OPHELIA.\n" in text and "ROMEO" not in text


# -- randomness: fresh for each reply, replayable per seed ------------------------------------------

def test_each_reply_draws_fresh_randomness(parts):
    """The same prompt in the same context, twice in one session: different replies when sampling."""
    chat, _ = session(parts, SamplingParams(temperature=1.0, seed=4), max_tokens=12)
    first = "".join(chat.reply("hello"))
    chat.clear()
    assert "".join(chat.reply("hello")) != first


def test_a_seeded_conversation_replays_exactly(parts):
    params, script = SamplingParams(temperature=1.0, seed=11), ["hello", "and then?", "hello"]
    replies = talk(session(parts, params)[0], script)
    assert talk(session(parts, params)[0], script) == replies
    assert talk(session(parts, SamplingParams(temperature=1.0, seed=12))[0], script) != replies


def test_an_unseeded_session_records_its_seed_and_replays_with_it(parts):
    chat, _ = session(parts, SAMPLED)
    seed = chat.settings()["seed"]
    assert isinstance(seed, int)
    replies = talk(chat, ["hello", "and then?"])
    assert talk(session(parts, SamplingParams(temperature=1.0, seed=seed))[0], ["hello", "and then?"]) == replies
    assert session(parts, SAMPLED)[0].settings()["seed"] != seed  # another session, another seed


def test_save_writes_the_seed_and_load_restores_it(parts, tmp_path):
    chat, _ = session(parts, SAMPLED)
    "".join(chat.reply("hello"))
    path = chat.save(tmp_path / "c.json")
    data = json.loads(path.read_text())
    assert data["settings"]["seed"] == chat.params.seed and data["replies"] == 1
    other, _ = session(parts, SAMPLED)
    other.load(path)
    assert other.params == chat.params and other.replies == 1
    assert "".join(other.reply("and then?")) == "".join(chat.reply("and then?"))  # continues as it would have


def test_set_checks_through_the_one_validator(parts):
    chat, _ = session(parts)
    chat.set("max_tokens", "5")
    assert chat.max_tokens == 5 and chat.settings()["max_tokens"] == 5
    for name, value, message in [("max_tokens", "0", "max_tokens must be positive"),
                                 ("top_p", "7", "top_p must be in (0, 1]"),
                                 ("seed", "-1", "seed must be an integer")]:
        with pytest.raises(UsageError, match=re.escape(message)):
            chat.set(name, value)
    assert chat.max_tokens == 5  # a refused value changes nothing


# -- the context window ------------------------------------------------------------------------------

def test_a_reply_that_fills_the_context_gets_a_notice(parts):
    chat, _ = session(parts, context=130, max_tokens=200)
    "".join(chat.reply("hello"))
    assert chat.last_stats.stopped_by == "context full" and chat.decoder.pos == 130
    assert "context window (130 tokens) is full" in chat.stop_notice()
    short, _ = session(parts)
    "".join(short.reply("hello"))
    assert short.last_stats.stopped_by != "context full" and short.stop_notice() is None


def test_a_context_above_the_models_maximum_is_capped_with_a_notice(parts, capsys):
    most = parts[0].config.max_position_embeddings
    chat, _ = session(parts, context=100000)
    assert chat.decoder.max_len == most
    assert capsys.readouterr().err == (f"note: --context 100000 is above the model's maximum of {most} "
                                       f"positions; using {most}\n")
    session(parts)  # no context given: the model's maximum (up to 4096), silently
    assert capsys.readouterr().err == ""
