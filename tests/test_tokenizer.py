"""moecli.text.tokenizer against transformers' AutoTokenizer (the oracle) on two tiny trained tokenizers."""
from __future__ import annotations

import json
import random

import pytest

from moecli.errors import TokenizerError
from moecli.text.tokenizer import Tokenizer
from tokenizer_fixtures import (
    LLAMA3_SPECIAL, make_bpe_tokenizer, make_sentencepiece_tokenizer, write_generation_config,
)

TEXTS = [
    "Hello world",
    "The expert router picks two experts per token.",
    " leading space",
    "  two leading spaces and trailing  ",
    "line one\nline two\n\n\ttabbed",
    "café naïve résumé Zürich",          # accents seen in training
    "emoji 😀👍🏽 and CJK 中文字 and Ελληνικά",  # unseen: byte fallback / byte-level
    "numbers 1234567890 3.14",
    "",
    "<s>starts with bos</s> then </s>text",
    "<|im_start|>user\nhi 😀<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|>x",
    "almost <|im_start but not quite |>",
]


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    return make_sentencepiece_tokenizer(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    return make_bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return make_bpe_tokenizer(tmp_path_factory.mktemp("llama3"), special_tokens=LLAMA3_SPECIAL,
                              bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token=None,
                              tokenizer_class="PreTrainedTokenizerFast")


def reference(path):
    """transformers' tokenizer for `path` (a test extra: failing to load one fails the test)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.mark.parametrize("which", ["sp_dir", "bpe_dir", "llama3_dir"])
def test_encode_decode_match_transformers(which, request):
    path = request.getfixturevalue(which)
    ours, ref = Tokenizer.from_dir(path), reference(path)
    assert ours.vocab_size == len(ref)
    for text in TEXTS:
        for add in (True, False):
            ids = ref(text, add_special_tokens=add).input_ids
            assert ours.encode(text, add_special_tokens=add) == ids, (text, add)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("which", ["sp_dir", "bpe_dir"])
def test_random_text_and_ids_match_transformers(which, request):
    path = request.getfixturevalue(which)
    ours, ref = Tokenizer.from_dir(path), reference(path)
    rng = random.Random(0)
    alphabet = list("abcdefghij klmnop   ÉéñΣ\n\t.,!?09中😀") + ["<s>", "</s>", "<|im_end|>", " the", "café"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        assert ours.encode(text) == ref(text).input_ids, text
        ids = [rng.randrange(len(ref)) for _ in range(rng.randint(0, 12))]  # includes broken byte runs
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), ids
        assert ours.decode(ids, False) == ref.decode(ids, skip_special_tokens=False), ids


def test_sentencepiece_without_transformers(sp_dir):
    """The behaviour the sentencepiece path promises, checked against sentencepiece itself."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = Tokenizer.from_dir(sp_dir)
    assert (tok.bos_id, tok.eos_ids, tok.bos_token, tok.eos_token) == (1, [2], "<s>", "</s>")
    for text in ["Hello world", "emoji 😀 and 中文", "café\nnaïve"]:
        assert tok.encode(text) == [1] + sp.encode(text)        # add_bos_token: true
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
        assert tok.decode(tok.encode(text)) == text == sp.decode(sp.encode(text))
    # "<0xF0>"-style byte pieces really are used for unseen characters.
    assert any(sp.is_byte(i) for i in tok.encode("😀"))
    # Special tokens written in text become their ids; the chunk after one gets no "▁" prefix.
    ids, head = tok.encode("a</s>b", add_special_tokens=False), sp.encode("a") + [2]
    assert ids[:len(head)] == head and sp.id_to_piece(ids[len(head)]).startswith("b")
    assert tok.decode(tok.encode("a</s>b")) == "ab"
    assert tok.decode(tok.encode("a</s>b"), skip_special_tokens=False) == "<s> a</s>b"


def test_sentencepiece_legacy_and_no_bos(tmp_path):
    path = make_sentencepiece_tokenizer(tmp_path, add_bos_token=False)
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert Tokenizer.from_dir(path).encode("hi")[0] != 1
    config["legacy"] = True  # every chunk between special tokens gets its own "▁"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok, ref = Tokenizer.from_dir(path), reference(path)
    for text in TEXTS:
        assert tok.encode(text) == ref(text).input_ids, text


def test_special_token_attributes(bpe_dir, llama3_dir):
    qwen = Tokenizer.from_dir(bpe_dir)
    assert qwen.bos_id is None and qwen.bos_token is None
    assert qwen.eos_token == "<|im_end|>" and qwen.eos_ids == [qwen.token_to_id("<|im_end|>")]
    assert qwen.encode("<|im_start|>") == [qwen.token_to_id("<|im_start|>")]
    llama = Tokenizer.from_dir(llama3_dir)
    assert llama.bos_token == "<|begin_of_text|>" and llama.bos_id == llama.token_to_id("<|begin_of_text|>")
    assert llama.encode("hi")[0] == llama.bos_id  # from tokenizer.json's post-processor
    assert llama.encode("hi", add_special_tokens=False)[0] != llama.bos_id


def test_eos_ids_from_generation_config(bpe_dir, tmp_path):
    import shutil

    folder = shutil.copytree(bpe_dir, tmp_path / "tok")
    im_end, eot = 2, 0  # <|im_end|>, <|endoftext|>
    assert Tokenizer.from_dir(folder).eos_ids == [im_end]
    write_generation_config(folder, eos_token_id=eot)  # an int
    assert Tokenizer.from_dir(folder).eos_ids == [im_end, eot]
    write_generation_config(folder, eos_token_id=[eot, im_end, 1], bos_token_id=0)  # a list, with a repeat
    tok = Tokenizer.from_dir(folder)
    assert tok.eos_ids == [im_end, eot, 1]
    assert tok.bos_id == 0  # tokenizer has no BOS, so generation_config's is used


def test_special_tokens_map_is_read(bpe_dir, tmp_path):
    import shutil

    folder = shutil.copytree(bpe_dir, tmp_path / "tok")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False,
                       "rstrip": False, "single_word": False}}))
    tok = Tokenizer.from_dir(folder)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_ids == [0]


def test_chat_template_sources(bpe_dir, tmp_path):
    import shutil

    folder = shutil.copytree(bpe_dir, tmp_path / "tok")
    assert Tokenizer.from_dir(folder).chat_template is None
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config_path.write_text(json.dumps(config))
    assert Tokenizer.from_dir(folder).chat_template == "D"
    config["chat_template"] = "S"
    config_path.write_text(json.dumps(config))
    assert Tokenizer.from_dir(folder).chat_template == "S"
    (folder / "chat_template.jinja").write_text("J")  # a separate file wins, as in transformers
    assert Tokenizer.from_dir(folder).chat_template == "J"
    (folder / "chat_template.jinja").unlink()
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": "X"}))
    assert Tokenizer.from_dir(folder).chat_template == "X"


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(TokenizerError, match=str(tmp_path)) as err:
        Tokenizer.from_dir(tmp_path)
    assert err.value.hint
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


# --- incremental decoding -------------------------------------------------------------------

STREAM_TEXTS = [
    "Hello world, how are you?",
    "  spaced   out  ",
    "😀👍🏽 emoji then words",
    "中文字 then café and naïve",
    "mixed 😀x中y é\nnew line",
    "<|im_start|>assistant\nHi 😀<|im_end|>",
    "a</s>b <s> c",
]


def stream(tok, ids, skip=True):
    dec = tok.incremental_decoder(skip_special_tokens=skip)
    pieces = [dec.add(i) for i in ids]
    return pieces + [dec.flush()]


@pytest.mark.parametrize("which", ["sp_dir", "bpe_dir"])
def test_incremental_decoder_matches_decode(which, request):
    tok = Tokenizer.from_dir(request.getfixturevalue(which))
    rng = random.Random(0)
    extra = ["".join(rng.choice("ab c😀中é\n") for _ in range(rng.randint(1, 30))) for _ in range(100)]
    for text in STREAM_TEXTS + extra:
        ids = tok.encode(text)
        for skip in (True, False):
            pieces = stream(tok, ids, skip)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), text
            assert not any("\ufffd" in p for p in pieces), (text, pieces)


def test_incremental_decoder_holds_partial_characters(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    ids = tok.encode("ok 😀 fine", add_special_tokens=False)
    assert sum(i in tok.byte_ids for i in ids) == 4  # the emoji is four "<0xNN>" byte pieces
    pieces = stream(tok, ids)
    assert "".join(pieces) == "ok 😀 fine"
    assert any("😀" in p for p in pieces)  # whole, in one piece
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("which", ["sp_dir", "bpe_dir"])
def test_incremental_decoder_on_random_ids(which, request):
    """Even for garbage (invalid UTF-8 byte runs), the pieces add up to decode()."""
    tok = Tokenizer.from_dir(request.getfixturevalue(which))
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 20))]
        assert "".join(stream(tok, ids)) == tok.decode(ids), ids


def test_incremental_decoder_spacing(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    ids = tok.encode("Hello world the model", add_special_tokens=False)
    pieces = stream(tok, ids)
    assert "".join(pieces) == "Hello world the model"
    assert " world" in "".join(pieces[1:])  # the "▁" of a later word becomes a space
    # A special token in the stream (skipped) does not eat the next word's space.
    eos = tok.eos_ids[0]
    assert "".join(stream(tok, tok.encode("Hi") + [eos] + tok.encode(" there", add_special_tokens=False))) \
        == tok.decode(tok.encode("Hi") + [eos] + tok.encode(" there", add_special_tokens=False))


def test_incremental_decoder_flush_emits_incomplete_tail(bpe_dir):
    tok = Tokenizer.from_dir(bpe_dir)
    ids = tok.encode("a😀", add_special_tokens=False)
    dec = tok.incremental_decoder()
    out = "".join(dec.add(i) for i in ids[:-1])
    assert "\ufffd" not in out
    tail = dec.flush()
    assert tail.endswith("\ufffd")  # held back until flush, and flush gives it (as decode would)
    assert out + tail == tok.decode(ids[:-1])
