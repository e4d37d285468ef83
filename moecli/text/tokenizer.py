"""Text <-> token ids for a Hugging Face checkpoint folder, without transformers.

A checkpoint ships its tokenizer in one of two forms:

* `tokenizer.json`: a complete pipeline (normalizer, pre-tokenizer, BPE/Unigram model,
  post-processor, decoder) that the Rust `tokenizers` library runs as written.
* `tokenizer.model`: a sentencepiece model (older Llama/Mistral checkpoints). transformers 5
  converts it into a Llama-style pipeline: no normalizer, a "▁" (dummy prefix) only before the
  first chunk of text (`legacy: false`, the default; `legacy: true` puts one before every chunk
  between special tokens), special tokens matched in the raw text, BOS only when
  `tokenizer_config.json` says `add_bos_token: true`, and a decoder that turns "▁" into spaces,
  `<0xNN>` pieces into bytes and drops the one leading space. `_SentencePiece` reproduces that
  on top of the `sentencepiece` library so ids match `AutoTokenizer` exactly.

The special tokens come from three files that often disagree: `tokenizer_config.json`,
`special_tokens_map.json` and `generation_config.json` (whose `eos_token_id` may be a list, as
for chat models that end a turn with one token and a document with another). We take the union
for `eos_ids`, so generation stops on any of them.

Printing while generating needs care: one character can span several tokens (byte fallback,
byte-level BPE), and sentencepiece drops the leading space of whatever it decodes first, so
decoding tokens one at a time gives wrong text. `IncrementalDecoder` decodes a short window of
recent tokens and prints only the growth, holding back incomplete characters.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from moecli.errors import TokenizerError, first_line

# Appended to a serialized sentencepiece ModelProto: field 3 (normalizer_spec) holding
# add_dummy_prefix=false (field 3) and remove_extra_whitespaces=false (field 4). Protobuf merges
# repeated sub-messages, so this overrides just those two settings; we add the "▁" ourselves.
_RAW_NORMALIZER = b"\x1a\x04\x18\x00\x20\x00"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise TokenizerError(f"cannot read {path}: {reason}",
                             "the file is not valid JSON; re-download the checkpoint") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} does not hold a JSON object", "re-download the checkpoint")
    return data


def _content(token) -> str | None:
    """A special token as stored in a config: a string, an AddedToken dict, or null."""
    return token.get("content") if isinstance(token, dict) else token


def _as_list(value) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else [int(v) for v in value]


class _HFTokenizers:
    """A `tokenizer.json` run by the `tokenizers` library, plus the tokens transformers adds to it."""

    def __init__(self, path: Path, config: dict, named: list[str | None]):
        from tokenizers import AddedToken, Tokenizer as RustTokenizer

        try:
            self.tok = RustTokenizer.from_file(str(path))
        except Exception as err:  # the Rust error type is not exported
            raise TokenizerError(f"cannot load {path}: {first_line(err)}",
                                 "the file is corrupt or from a newer `tokenizers`; try upgrading it")
        # Like transformers: tokens from the config that tokenizer.json does not know as added
        # tokens become special added tokens (matched whole in text, skipped when decoding).
        known = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        entries = list((config.get("added_tokens_decoder") or {}).values()) + named
        for entry in entries:
            content = _content(entry)
            if content is None or content in known:
                continue
            opts = {k: entry[k] for k in ("lstrip", "rstrip", "single_word", "normalized", "special")
                    if isinstance(entry, dict) and k in entry}
            self.tok.add_tokens([AddedToken(content, **{"special": True, **opts})])
            known.add(content)
        self.special_ids = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.byte_ids = {i for t, i in self.tok.get_vocab().items() if _BYTE_PIECE.fullmatch(t)}

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


class _SentencePiece:
    """A `tokenizer.model`, encoded and decoded the way transformers 5's LlamaTokenizer does."""

    def __init__(self, path: Path, config: dict, named: list[str | None]):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(path.read_bytes() + _RAW_NORMALIZER)
        except Exception as err:
            raise TokenizerError(f"cannot load sentencepiece model {path}: {err}", "the file is corrupt; re-download it")
        n = self.sp.get_piece_size()
        # Special tokens: sentencepiece control pieces (<s>, </s>), the unknown piece, and the
        # tokens the config names. Added tokens may have ids past the sentencepiece vocabulary.
        self.added: dict[str, int] = {self.sp.id_to_piece(i): i for i in range(n)
                                      if self.sp.is_control(i) or self.sp.is_unknown(i)}
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            if _content(entry) is not None:
                self.added[_content(entry)] = int(key)
        for entry in named:
            token = _content(entry)
            if token is not None and token not in self.added and self._piece_id(token) is not None:
                self.added[token] = self._piece_id(token)
        self.special_ids = set(self.added.values())
        self.id_to_added = {i: t for t, i in self.added.items()}
        self.vocab_size = max([n - 1, *self.special_ids]) + 1
        self.byte_ids = {i for i in range(n) if self.sp.is_byte(i)}
        alternatives = sorted(self.added, key=len, reverse=True)
        self.split = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        add_prefix_space = config.get("add_prefix_space")
        self.prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
        self.legacy = bool(config.get("legacy", False))
        self.bos = self.added.get(named[0] or "<s>")
        self.eos = self.added.get(named[1] or "</s>")
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos is not None
        self.add_eos = bool(config.get("add_eos_token", False)) and self.eos is not None

    def _piece_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids, start = [], 0
        for match in self.split.finditer(text) if self.split else ():
            self._encode_chunk(text[start:match.start()], start == 0, ids)
            ids.append(self.added[match.group()])
            start = match.end()
        self._encode_chunk(text[start:], start == 0, ids)
        if add_special_tokens:
            ids = [self.bos] * self.add_bos + ids + [self.eos] * self.add_eos
        return ids

    def _encode_chunk(self, chunk: str, first: bool, ids: list[int]) -> None:
        if not chunk:
            return
        # The dummy prefix, as tokenizers' Metaspace adds it: not if the chunk already starts with one.
        if self.prefix_space and (first or self.legacy) and chunk[0] not in " ▁":
            chunk = " " + chunk
        ids.extend(self.sp.encode(chunk))

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        n, pieces = self.sp.get_piece_size(), []
        for i in ids:
            if i in self.special_ids:
                if not skip_special_tokens:
                    pieces.append(self.id_to_added[i])
            elif 0 <= i < n:
                pieces.append(self.sp.id_to_piece(i))
        # tokenizers' decoders in order: Replace("▁", " "), ByteFallback, Fuse, Strip(left=1).
        out, pending = [], bytearray()
        for piece in pieces + [""]:
            byte = _BYTE_PIECE.fullmatch(piece)
            if byte:
                pending.append(int(byte.group(1), 16))
                continue
            if pending:  # a run of byte pieces: valid UTF-8, or one U+FFFD per byte
                try:
                    out.append(pending.decode("utf-8"))
                except UnicodeDecodeError:
                    out.append("\ufffd" * len(pending))
                pending.clear()
            out.append(piece.replace("▁", " "))
        text = "".join(out)
        return text[1:] if self.prefix_space and text.startswith(" ") else text

    def token_to_id(self, token: str) -> int | None:
        return self.added.get(token, self._piece_id(token))


class Tokenizer:
    """A checkpoint's tokenizer: `encode`, `decode`, special ids and the chat template."""

    def __init__(self, backend, *, bos_id, eos_ids, bos_token, eos_token, chat_template, folder):
        self._backend = backend
        self.bos_id: int | None = bos_id
        self.eos_ids: list[int] = eos_ids
        self.bos_token: str | None = bos_token
        self.eos_token: str | None = eos_token
        self.chat_template: str | None = chat_template
        self.folder = folder
        self.special_ids: frozenset[int] = frozenset(backend.special_ids)
        #: Byte-fallback pieces ("<0xE4>"): text is made from a whole run of them at once.
        self.byte_ids: frozenset[int] = frozenset(backend.byte_ids)
        #: Number of ids the tokenizer can produce, added tokens included (the model's
        #: embedding may be larger: vocabularies are often padded to a multiple of 64).
        self.vocab_size: int = backend.vocab_size

    @classmethod
    def from_dir(cls, path) -> "Tokenizer":
        folder = Path(path)
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        generation = _read_json(folder / "generation_config.json")

        def named(key):  # tokenizer_config.json wins over special_tokens_map.json
            return _content(config.get(key)) if key in config else _content(special_map.get(key))

        tokens = [named(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
        if (folder / "tokenizer.json").is_file():
            backend = _HFTokenizers(folder / "tokenizer.json", config, tokens)
        elif (folder / "tokenizer.model").is_file():
            backend = _SentencePiece(folder / "tokenizer.model", config, tokens)
        elif not (folder / "config.json").is_file():  # not a checkpoint at all: say that, not "no tokenizer"
            raise TokenizerError(f"{folder} is not a Hugging Face checkpoint: no config.json, tokenizer.json or "
                                 "tokenizer.model", "pass a checkpoint folder, or run `moe download REPO` first")
        else:
            raise TokenizerError(f"no tokenizer in {folder}: expected tokenizer.json or tokenizer.model",
                                 "download the tokenizer files with the weights, or pass a complete checkpoint")

        def to_id(token):
            return None if token is None else backend.token_to_id(token)

        bos_token = named("bos_token")
        bos_id = to_id(bos_token)
        if bos_id is None and _as_list(generation.get("bos_token_id")):
            bos_id = _as_list(generation.get("bos_token_id"))[0]
        eos_ids: list[int] = []
        for i in [to_id(_content(config.get("eos_token"))), to_id(_content(special_map.get("eos_token"))),
                  *_as_list(generation.get("eos_token_id"))]:
            if i is not None and i not in eos_ids:
                eos_ids.append(i)
        eos_token = named("eos_token")
        if eos_token is None and eos_ids:
            eos_token = backend.decode([eos_ids[0]], skip_special_tokens=False)
        return cls(backend, bos_id=bos_id, eos_ids=eos_ids, bos_token=bos_token, eos_token=eos_token,
                   chat_template=_find_chat_template(folder, config), folder=folder)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids.

        `add_special_tokens` adds what the checkpoint adds to a single sequence (usually BOS).
        Use False for text rendered from a chat template, which already contains them.
        """
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> "IncrementalDecoder":
        return IncrementalDecoder(self, skip_special_tokens)

    def __repr__(self) -> str:
        kind = type(self._backend).__name__.strip("_")
        return f"Tokenizer({str(self.folder)!r}, {kind}, vocab_size={self.vocab_size}, eos_ids={self.eos_ids})"


def _find_chat_template(folder: Path, config: dict) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's entry, else chat_template.json."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = by_name.get("default")
    return template if isinstance(template, str) else None


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces that are safe to print as they come.

    It keeps a short window of ids: the tokens of the last printed piece (`read` of them) and
    the ones since. decode(window) minus decode(printed part) is the new text, with the right
    spacing because both decodes start at the same token. New text is held back while it ends
    in U+FFFD (an incomplete UTF-8 character from byte-level BPE) or while the last token is a
    byte-fallback piece: a run of those is decoded as a whole (one U+FFFD per byte if the run is
    not valid UTF-8), so it must end before its text is known. The pieces thus add up exactly to
    `decode(all ids)`. Each step decodes only the window, so it costs O(piece), not O(n).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._read = 0

    def add(self, token_id: int) -> str:
        """Feed one token id; return the text that became final (possibly "")."""
        token_id = int(token_id)
        if self._skip and token_id in self._tok.special_ids:
            return ""  # decode would drop it anyway; here it can never be a whole window
        self._ids.append(token_id)
        if token_id in self._tok.byte_ids:
            return ""
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is held back (e.g. an incomplete character at the end) and reset."""
        text = self._emit(final=True)
        self._ids, self._read = [], 0
        return text

    def _emit(self, final: bool) -> str:
        before = self._tok.decode(self._ids[:self._read], self._skip)
        after = self._tok.decode(self._ids, self._skip)
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return ""
        del self._ids[:self._read]  # the older piece's tokens are never decoded again
        self._read = len(self._ids)
        return after[len(before):]
