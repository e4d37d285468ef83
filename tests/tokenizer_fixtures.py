"""Small, real tokenizers built in a second, for tests that need one.

Downloading a real checkpoint's tokenizer in a unit test is slow and needs the network, so we
train two tiny ones on a few KB of generated text and write them out in the same layout a
Hugging Face checkpoint uses:

* `make_sentencepiece_tokenizer(dir)`: a Llama-style sentencepiece BPE `tokenizer.model` with
  `byte_fallback=True` (characters it never saw, such as emoji and CJK, become `<0xNN>` byte
  pieces) plus a `tokenizer_config.json` naming `<s>`/`</s>` and `add_bos_token`.
* `make_bpe_tokenizer(dir)`: a Qwen-style byte-level BPE `tokenizer.json` (via the `tokenizers`
  library) with the ChatML special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`.

Both return the directory, so `Tokenizer.from_dir(make_bpe_tokenizer(tmp_path))` reads naturally.
Other test modules reuse these helpers.
"""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

# Words to build sentences from: mostly English, a few accented words so that the trained
# vocabulary has some multi-byte characters of its own, digits, and punctuation.
_WORDS = (
    "the a of and to in is it you that he was for on are with as his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find any new work "
    "part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line "
    "expert mixture router token layer model attention cache prompt chat "
    "café naïve résumé über façade jalapeño señor déjà vu crème brûlée Zürich"
).split()

CHATML_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def training_text(n_sentences: int = 400, seed: int = 0) -> list[str]:
    """Deterministic pseudo-sentences (about 20 KB); the same every run."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
        words[0] = words[0].capitalize()
        if i % 7 == 0:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2025)))
        lines.append(" ".join(words) + rng.choice(".?!,;") + ("  " if i % 11 == 0 else ""))
    return lines


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False), encoding="utf-8")


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def make_sentencepiece_tokenizer(directory, *, vocab_size: int = 600, add_bos_token: bool = True,
                                 chat_template: str | None = None) -> Path:
    """Train a Llama-like sentencepiece BPE model and write tokenizer.model + tokenizer_config.json."""
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_text()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,             # unseen characters -> <0xNN> pieces instead of <unk>
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,  # the Llama settings
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 4096,
        "added_tokens_decoder": {str(i): _added_token(t) for i, t in enumerate(["<unk>", "<s>", "</s>"])},
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_json(directory / "tokenizer_config.json", config)
    return directory


def make_bpe_tokenizer(directory, *, vocab_size: int = 700, chat_template: str | None = None,
                       tokenizer_class: str = "Qwen2Tokenizer", special_tokens=CHATML_SPECIAL,
                       bos_token: str | None = None, eos_token: str = "<|im_end|>",
                       pad_token: str | None = "<|endoftext|>") -> Path:
    """Train a Qwen2-like byte-level BPE and write tokenizer.json + tokenizer_config.json.

    The defaults give Qwen's ChatML tokens. Pass e.g. `special_tokens=LLAMA3_SPECIAL,
    bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"` for a Llama-3-like tokenizer: with a
    `bos_token`, tokenizer.json gets a post-processor that puts it before every encoded text.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    # Qwen2's pre-tokenizer: split words/numbers/punctuation with a regex, then map bytes to
    # printable characters (the "byte-level" trick, so every UTF-8 byte has a token).
    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_text(), trainer=trainer)
    if bos_token is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token}:0 $A:0", pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
            special_tokens=[(bos_token, tok.token_to_id(bos_token))])
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": tokenizer_class,
        "add_prefix_space": False,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "pad_token": pad_token,
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "added_tokens_decoder": {str(tok.token_to_id(t)): _added_token(t) for t in special_tokens},
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write_json(directory / "tokenizer_config.json", config)
    return directory


def write_generation_config(directory, **fields) -> Path:
    """Write generation_config.json (e.g. eos_token_id=[2, 7]) into a tokenizer folder."""
    directory = Path(directory)
    _write_json(directory / "generation_config.json", fields)
    return directory
