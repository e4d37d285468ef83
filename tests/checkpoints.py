"""Tiny complete checkpoints (weights + tokenizer + chat template) for CLI and API tests."""
from __future__ import annotations

from pathlib import Path

from hf_models import build, save
from tokenizer_fixtures import make_bpe_tokenizer, make_sentencepiece_tokenizer

TEMPLATES = Path(__file__).parent / "fixtures" / "templates"


def chat_checkpoint(folder: Path, kind: str = "chatml", model_type: str = "mixtral", **overrides) -> Path:
    """A tiny random model (a Mixtral of 4 experts unless `model_type` names another of
    `hf_models.CONFIGS`) with a real tokenizer: "chatml" (tokenizer.json + Qwen's ChatML
    template), "mistral" (tokenizer.model + the Mistral-instruct template) or "plain"
    (tokenizer.model, no template)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "chatml":
        make_bpe_tokenizer(folder, vocab_size=300, chat_template=(TEMPLATES / "qwen2.5-instruct.jinja").read_text())
        vocab, eos = 300 + 3, None
    else:
        template = (TEMPLATES / "mistral-instruct.jinja").read_text() if kind == "mistral" else None
        make_sentencepiece_tokenizer(folder, vocab_size=600, chat_template=template)
        vocab, eos = 600, 2
    from moecli.text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(folder)
    defaults = dict(num_local_experts=4) if model_type == "mixtral" else {}
    model = build(model_type, **{**defaults, "vocab_size": max(vocab, tok.vocab_size),
                                 "eos_token_id": tok.eos_ids[0] if tok.eos_ids else eos, **overrides})
    return save(model, folder)
