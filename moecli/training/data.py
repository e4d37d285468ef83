"""The training corpus and its tokenizer: Shakespeare's works, turned into a stream of token ids.

The corpus (41 plays and poems, public domain, 4.9 MB of plain text) ships inside the repository
as `data/shakespeare.tar.xz` (~1.3 MB), so a clone reproduces the bundled model's training
without downloading anything. `data/README.md` says where the texts come from.

Pipeline, one function each:

1. `read_works(source)`: {work name: raw text} from the archive, or from a folder of `.txt` files.
2. `normalise_work(name, text)`: one consistent play format. Speaker lines become upper-case full
   names ending in a period (Hamlet's `Ham.`, Lear's `Glou.` and Romeo and Juliet's `Romeo.` all
   become `HAMLET.`, `GLOUCESTER.`, `ROMEO.` like the other plays), and every speech ends with the
   end-of-sequence token `</s>`, which replaces the blank line before the next speaker. A model
   trained on that learns to *stop* after one speech, which is what a chat turn needs:

       BERNARDO.
       Who's there?
       </s>
       FRANCISCO.
       Nay, answer me: stand, and unfold yourself.
       </s>

3. `split_works(works, held_out)`: whole works are held out for validation, not random lines: a
   random-line split would leak every play's characters, names and phrasing into the
   validation text and flatter the validation loss.
4. `train_tokenizer(texts, folder, vocab_size)`: a sentencepiece BPE tokenizer in the layout of a
   Llama/Mistral checkpoint (`tokenizer.model` + `tokenizer_config.json` + friends), with
   `CHAT_TEMPLATE`, a chat template in the same play format.
5. `encode(tokenizer, texts)`: one int32 token stream, each work opened by `<s>`.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np

from moecli.errors import UsageError
from moecli.hub.bundled import bundled_file

#: The repository's data/shakespeare.tar.xz, or the copy inside an installed wheel.
BUNDLED_ARCHIVE = bundled_file("data/shakespeare.tar.xz")

#: Held out for validation: one play of each kind (tragedy, comedy, history, romance), ~10% of the
#: text. All four use upper-case speaker names, like most of the training plays.
HELD_OUT = ("macbeth", "twelfth_night", "richard_ii", "winters_tale")

BOS, EOS, UNK = "<s>", "</s>", "<unk>"

# ----------------------------------------------------------------------------- reading the corpus


def work_name(filename: str) -> str:
    """`hamlet_gut.txt` -> `hamlet` (the files carry Project Gutenberg's `_gut` suffix)."""
    return Path(filename).name.removesuffix(".txt").removesuffix("_gut")


def read_works(source: str | Path | None = None) -> dict[str, str]:
    """{work name: text} from a `.tar.xz`/`.tar.gz`/`.tar` archive of `.txt` files (default: the
    bundled Shakespeare archive) or from a folder of `.txt` files, sorted by name."""
    path = Path(source) if source is not None else BUNDLED_ARCHIVE
    works: dict[str, str] = {}
    if path.is_dir():
        for file in sorted(path.glob("*.txt")):
            works[work_name(file.name)] = file.read_text(encoding="utf-8", errors="replace")
    elif path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as archive:
            for member in sorted(archive.getmembers(), key=lambda m: m.name):
                if member.isfile() and member.name.endswith(".txt"):
                    data = archive.extractfile(member).read()
                    works[work_name(member.name)] = data.decode("utf-8", errors="replace")
    elif not path.exists():
        hint = ("the bundled corpus belongs in data/shakespeare.tar.xz of a moecli checkout"
                if source is None else "pass --data a .tar.xz archive or a folder of .txt files")
        raise UsageError(f"training data {path} does not exist", hint)
    else:
        raise UsageError(f"{path} is neither a folder nor a tar archive",
                         "pass --data a .tar.xz archive or a folder of .txt files")
    if not works:
        raise UsageError(f"no .txt files in {path}", "the corpus is one plain-text file per work")
    return dict(sorted(works.items()))


def build_archive(source_dir: str | Path, archive: str | Path = BUNDLED_ARCHIVE) -> Path:
    """Pack a folder of `.txt` works into a reproducible `.tar.xz` (sorted names, zeroed times and
    owners, so the same texts always give the same bytes). This is how data/shakespeare.tar.xz
    was made from the `_gut.txt` files."""
    source_dir, archive = Path(source_dir), Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz", preset=9) as tar:
        for file in sorted(source_dir.glob("*.txt")):
            data = file.read_bytes()
            info = tarfile.TarInfo(f"shakespeare/{file.name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    archive.write_bytes(buffer.getvalue())
    return archive


def split_works(works: dict[str, str], held_out=HELD_OUT) -> tuple[dict[str, str], dict[str, str]]:
    """(training works, validation works): the held-out works, whole, are the validation split."""
    held_out = tuple(held_out)
    missing = [name for name in held_out if name not in works]
    if missing:
        raise UsageError(f"held-out work {missing[0]!r} is not in the corpus",
                         f"choose --held-out among: {', '.join(works)}")
    train = {k: v for k, v in works.items() if k not in held_out}
    valid = {k: v for k, v in works.items() if k in held_out}
    if not train or not valid:
        raise UsageError(f"the split leaves {len(train)} training and {len(valid)} validation works",
                         "hold out at least one work and keep at least one for training")
    return train, valid


# ----------------------------------------------------------------------------- play format

# The three plays whose Gutenberg text abbreviates speaker names; every other play spells them
# out in upper case ("KING HENRY.") or title case (Romeo and Juliet: "Lady Capulet.").
ABBREVIATIONS: dict[str, dict[str, str]] = {
    "hamlet": {
        "Ber": "BERNARDO", "Fran": "FRANCISCO", "Hor": "HORATIO", "Mar": "MARCELLUS", "Ham": "HAMLET",
        "Pol": "POLONIUS", "Laer": "LAERTES", "Oph": "OPHELIA", "Ros": "ROSENCRANTZ",
        "Guil": "GUILDENSTERN", "Guild": "GUILDENSTERN", "Osr": "OSRIC", "Rey": "REYNALDO",
        "Volt": "VOLTIMAND", "Cor": "CORNELIUS", "Fort": "FORTINBRAS", "For": "FORTINBRAS",
        "Capt": "CAPTAIN", "Gent": "GENTLEMAN", "Mess": "MESSENGER", "Luc": "LUCIANUS",
        "Pro": "PROLOGUE", "I Play": "FIRST PLAYER", "I Player": "FIRST PLAYER",
        "I Sailor": "FIRST SAILOR", "P. King": "PLAYER KING", "P. Queen": "PLAYER QUEEN",
        "Ros and Guil": "ROSENCRANTZ AND GUILDENSTERN", "Ros. and Guil": "ROSENCRANTZ AND GUILDENSTERN",
        "Ros. and Guild": "ROSENCRANTZ AND GUILDENSTERN", "Hor. and Mar": "HORATIO AND MARCELLUS",
        "Mar. and Ber": "MARCELLUS AND BERNARDO", "Cor. and Volt": "CORNELIUS AND VOLTIMAND",
    },
    "lear": {
        "Alb": "ALBANY", "Bur": "BURGUNDY", "Capt": "CAPTAIN", "Cor": "CORDELIA", "Corn": "CORNWALL",
        "Cur": "CURAN", "Doct": "DOCTOR", "Edg": "EDGAR", "Edm": "EDMUND", "Gent": "GENTLEMAN",
        "Glou": "GLOUCESTER", "Gon": "GONERIL", "Her": "HERALD", "Mess": "MESSENGER", "Off": "OFFICER",
        "Osw": "OSWALD", "Phys": "PHYSICIAN", "Reg": "REGAN", "First Serv": "FIRST SERVANT",
        "Second Serv": "SECOND SERVANT", "Third Serv": "THIRD SERVANT", "Alb. and Corn": "ALBANY AND CORNWALL",
    },
    "henry_iv_part_1": {
        "ARCH": "ARCHBISHOP", "BARD": "BARDOLPH", "CAR": "CARRIER", "CHAM": "CHAMBERLAIN",
        "DOUG": "DOUGLAS", "FAL": "FALSTAFF", "FRAN": "FRANCIS", "GADS": "GADSHILL", "GLEND": "GLENDOWER",
        "HOT": "HOTSPUR", "LADY P": "LADY PERCY", "LAN": "LANCASTER", "MESS": "MESSENGER",
        "MORT": "MORTIMER", "NORTH": "NORTHUMBERLAND", "OST": "OSTLER", "SERV": "SERVANT",
        "SHER": "SHERIFF", "SIR M": "SIR MICHAEL", "VER": "VERNON", "VINT": "VINTNER",
        "WEST": "WESTMORELAND", "KING HENRY THE FOURTH": "KING",
    },
}

_NAME_WORD = r"(?:[A-Z][A-Za-z'\-]*\.?|I{1,3}|and|of|the|de|le|la|du)"
_SPEAKER = re.compile(rf"^[A-Z][A-Za-z'\-]*\.?(?: +{_NAME_WORD}){{0,4}}$")
_HEADING = re.compile(r"^(?:ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction)\b")


def _speaker_key(line: str) -> str:
    return re.sub(r" +", " ", line.strip()).rstrip(".")


def _speaker_candidates(blocks: list[list[str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for block in blocks:
        first = block[0].strip()
        if len(block) > 1 and len(first) <= 40 and _SPEAKER.match(first) and not _HEADING.match(first):
            counts[_speaker_key(first)] = counts.get(_speaker_key(first), 0) + 1
    return counts


def normalise_work(name: str, text: str) -> str:
    """A work in the training format: speaker lines as `FULL NAME.`, one blank line between
    blocks, and `</s>` after each speech instead of the blank line before the next speaker.

    A block (lines between blank lines) is a speech when its first line looks like a speaker
    name and more lines follow: upper case ("KING HENRY.", "THESEUS"), or title case ending in a
    period ("Ham.", "Lady Capulet.") that occurs at least three times in the work (so a short
    line of verse such as "Adieu." that opens a block is not taken for a speaker). A speech runs
    until the next speaker or an ACT/SCENE heading, so stage directions inside it ("[Exit.]")
    and lines that continue it after one stay in the same turn. Poems have no speakers: their
    stanzas pass through, and only the end of the work gets `</s>`.
    """
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    blocks: list[list[str]] = []
    current: list[str] = []
    for line in lines + [""]:
        if line.strip():
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    counts = _speaker_candidates(blocks)
    abbreviations = ABBREVIATIONS.get(name, {})

    def speaker(block: list[str]) -> str | None:
        first = block[0].strip()
        if len(block) < 2 or len(first) > 40 or not _SPEAKER.match(first) or _HEADING.match(first):
            return None
        key = _speaker_key(first)
        upper = key == key.upper()
        known = key in abbreviations or key.upper() in abbreviations
        if not upper and not known and not (first.endswith(".") and counts.get(key, 0) >= 3):
            return None
        full = abbreviations.get(key) or abbreviations.get(key.upper()) or key
        return full.upper()

    parts: list[str] = []   # rendered blocks and separators
    in_speech = False
    for block in blocks:
        who = speaker(block)
        if who is not None or _HEADING.match(block[0].strip()):
            if in_speech:
                parts.append(f"\n{EOS}\n")
            elif parts:
                parts.append("\n\n")
            in_speech = who is not None
            body = block[1:] if who is not None else block
            parts.append("\n".join(([f"{who}."] if who is not None else []) + body))
        else:
            if parts:
                parts.append("\n\n")
            parts.append("\n".join(block))
    parts.append(f"\n{EOS}")
    return "".join(parts)


# ----------------------------------------------------------------------------- tokenizer

#: The chat template: a conversation is a scene. The system message (optional) is the scene
#: setting, written as the plays write it ("SCENE II. Capulet's orchard.\n\n[Enter JULIET.]");
#: each user turn is a speech by the user's character (default ROMEO), each assistant turn a
#: speech by the model's character (default JULIET), and every speech ends with `</s>`, as in the
#: training text. The characters can be set per message with a `name` key, or for the whole
#: conversation with the template variables `user_speaker` and `assistant_speaker`.
CHAT_TEMPLATE = (
    "{%- set user_name = user_speaker if user_speaker is defined and user_speaker else 'ROMEO' -%}"
    "{%- set model_name = assistant_speaker if assistant_speaker is defined and assistant_speaker else 'JULIET' -%}"
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ message['content'] | trim }}{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'user' or message['role'] == 'assistant' -%}"
    "{%- if message.get('name') -%}{%- set who = message['name'] -%}"
    "{%- elif message['role'] == 'user' -%}{%- set who = user_name -%}"
    "{%- else -%}{%- set who = model_name -%}{%- endif -%}"
    "{{ who | trim | upper }}{{ '.\\n' }}{{ message['content'] | trim }}{{ '\\n' + eos_token + '\\n' }}"
    "{%- else -%}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ model_name | trim | upper }}{{ '.\\n' }}{%- endif -%}"
)


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def train_tokenizer(texts: list[str], folder: str | Path, vocab_size: int = 2048,
                    model_max_length: int = 4096) -> Path:
    """Train a sentencepiece BPE tokenizer on `texts` and write it as a Llama-style checkpoint
    tokenizer: `tokenizer.model`, `tokenizer_config.json` (with `CHAT_TEMPLATE`),
    `special_tokens_map.json` and `generation_config.json`.

    Byte-pair encoding (Sennrich et al. 2016) starts from characters and repeatedly merges the
    most frequent adjacent pair into a new token until the vocabulary is full, so frequent words
    ("the", "HAMLET.") become one token and rare ones several. `byte_fallback` gives the 256
    bytes a token each (`<0x0A>` is the newline), so any text can be encoded without `<unk>`.
    Ids 0, 1, 2 are `<unk>`, `<s>`, `</s>`; there is no padding token (training batches are
    packed, never padded).

    The trainer sees each line as it appears in the token stream: no "▁" (space) is prepended to
    a line, because in the stream a line follows a newline byte, not a space. (Llama-style
    tokenizers prepend one "▁" to the start of the whole text only.)
    """
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sentences = [line for text in texts for line in text.split("\n")
                 if line.strip() and line.strip() not in (BOS, EOS)]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_digits=True, allow_whitespace_only_pieces=True, split_by_unicode_script=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
            hard_vocab_limit=False, num_threads=2, minloglevel=2,
            max_sentence_length=1 << 16, train_extremely_large_corpus=False)
    except RuntimeError as err:
        raise UsageError(f"sentencepiece could not train a {vocab_size}-token vocabulary: {err}",
                         "use a smaller --vocab-size or more text") from None
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    write_tokenizer_config(folder, model_max_length)
    return folder


def write_tokenizer_config(folder: str | Path, model_max_length: int = 4096) -> None:
    """tokenizer_config.json, special_tokens_map.json and generation_config.json for a tokenizer
    trained by `train_tokenizer`: BOS added to plain text, the play chat template, and `</s>`
    (the end of a speech) as the token that stops generation."""
    folder = Path(folder)
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": model_max_length,
        "added_tokens_decoder": {str(i): _added_token(t) for i, t in enumerate([UNK, BOS, EOS])},
        "chat_template": CHAT_TEMPLATE,
    }
    special = {"bos_token": _added_token(BOS), "eos_token": _added_token(EOS), "unk_token": _added_token(UNK)}
    for entry in special.values():
        del entry["special"]
    generation = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.8,
                  "top_p": 0.95}
    for filename, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special),
                          ("generation_config.json", generation)):
        (folder / filename).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def encode(tokenizer, texts: list[str]) -> np.ndarray:
    """One int32 stream of the texts' tokens, each text opened by `<s>`; the `</s>` markers in
    the normalised text become the end-of-sequence id (the tokenizer matches special tokens
    written in the text)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(BOS + text, add_special_tokens=False))
    return np.asarray(ids, np.int32)


def unigram_loss(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats per token) of `eval_tokens` under a unigram model of `train_tokens`
    (token frequencies with add-one smoothing): the loss of a model that ignores context. A
    language model has learnt something from context only if it beats this."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[eval_tokens].mean())
