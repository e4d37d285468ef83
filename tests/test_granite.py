"""IBM Granite MoE (granitemoe) and Granite MoE with a shared expert (granitemoeshared) against transformers
on tiny random float32 models with unusual settings: head_dim != hidden / heads, odd expert counts, MQA,
tied embeddings, and each multiplier (embedding, attention, residual, logits) far from 1. test_parity's
logits, 16 greedy tokens and cached-decoding tests run on these pairs (imported below); then each
multiplier is shown to matter, transformers 5's own tensor names load, the experts split over 2 and 4 CPU
devices, the parameter count is transformers', and the real granite-3.1 shapes count as IBM says."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as T
from safetensors.torch import save_file

from device_split import assert_experts_split_equal
from hf_models import build, hf_logits, save
from test_parity import (PROMPT, test_greedy_generation_matches_transformers,  # noqa: F401  (run on `pair`)
                         test_incremental_decoding_equals_full_forward, test_logits_match_transformers)
from moecli import load_model
from moecli.benchmark import harness as bench
from moecli.checkpoints.families import config_from_hf
from moecli.errors import ConfigError
from moecli.model.sizes import parameter_counts

MULTIPLIERS = dict(embedding_multiplier=3.0, attention_multiplier=0.5, residual_multiplier=0.3, logits_scaling=4.0)
CASES = {
    # 5 experts top-2, head_dim 12 (hidden / heads = 8), the softmax scale 0.5 (not 12^-0.5), tied embeddings
    "granite-odd-headdim-tied": ("granitemoe", dict(
        MULTIPLIERS, num_local_experts=5, intermediate_size=24, head_dim=12, tie_word_embeddings=True)),
    # 7 experts top-3, MQA, head_dim 16, q/k/v/o biases, a shared expert; multipliers on the other side of 1
    "granite-shared-mqa-top3-bias": ("granitemoeshared", dict(
        num_local_experts=7, num_experts_per_tok=3, intermediate_size=20, num_key_value_heads=1, head_dim=16,
        shared_intermediate_size=28, attention_bias=True, embedding_multiplier=0.2, attention_multiplier=0.15,
        residual_multiplier=1.8, logits_scaling=0.4, rope_parameters={"rope_type": "default", "rope_theta": 5e5})),
}
# ibm-granite/granite-3.1-{1b-a400m,3b-a800m}-instruct's config.json (the fields GraniteMoeConfig's defaults lack)
GRANITE_31 = dict(attention_multiplier=0.015625, embedding_multiplier=12.0, residual_multiplier=0.22,
                  logits_scaling=6.0, vocab_size=49155, intermediate_size=512, num_key_value_heads=8,
                  num_experts_per_tok=8, tie_word_embeddings=True, max_position_embeddings=131072,
                  rope_theta=10000000.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
REAL = {  # name: (config fields, IBM's published (total, active) in billions, to their one decimal)
    "granite-3.1-1b-a400m": (dict(GRANITE_31, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                  num_local_experts=32), (1.3, 0.4)),
    "granite-3.1-3b-a800m": (dict(GRANITE_31, hidden_size=1536, num_hidden_layers=32, num_attention_heads=24,
                                  num_local_experts=40), (3.3, 0.8)),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, moecli model) loaded from the same saved checkpoint."""
    model_type, overrides = CASES[request.param]
    hf = build(model_type, **overrides)
    return hf, load_model(save(hf, tmp_path_factory.mktemp(request.param)), dtype="float32")


def test_config_reads_the_multipliers_and_the_count_is_transformers(pair):
    hf, model = pair
    c, hc = model.config, hf.config
    assert c.head_dim == hc.head_dim != c.d_model // c.n_heads and c.n_experts == hc.num_local_experts
    assert (c.embedding_scale, c.attention_scale, c.residual_scale) == (
        hc.embedding_multiplier, hc.attention_multiplier, hc.residual_multiplier)
    assert c.logits_scale == pytest.approx(1 / hc.logits_scaling) and c.tie_embeddings == hc.tie_word_embeddings
    assert c.d_shared_expert == getattr(hc, "shared_intermediate_size", 0) and not c.shared_expert_gate
    assert parameter_counts(c).total == model.n_params == sum(p.numel() for p in hf.parameters())


def far_from(model, hf, **changes) -> float:
    theirs = hf_logits(hf, [PROMPT]).numpy()
    return float(np.max(np.abs(np.asarray(model.with_config(**changes)([PROMPT])) - theirs)))


@pytest.mark.parametrize("case", list(CASES))
def test_each_multiplier_changes_the_logits(case, tmp_path):
    """The parity is not vacuous: leaving out any one multiplier (or the shared expert) moves the logits."""
    model_type, overrides = CASES[case]
    hf = build(model_type, **overrides)
    model = load_model(save(hf, tmp_path), dtype="float32")
    assert far_from(model, hf) < 1e-4
    for name in ("embedding_scale", "residual_scale", "logits_scale"):
        assert far_from(model, hf, **{name: 1.0}) > 1e-2, name
    assert far_from(model, hf, attention_scale=None) > 1e-2
    if model.config.d_shared_expert:
        model.params = {k: v for k, v in model.params.items() if "shared_expert" not in k}
        assert far_from(model, hf, d_shared_expert=0) > 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_state_dict_names(case, tmp_path):
    """transformers 5's own state dict (experts.gate_up_proj, experts.down_proj, router.weight) loads too;
    save_pretrained writes the Hub's (input_linear, output_linear, router.layer), which the pair loads."""
    model_type, overrides = CASES[case]
    hf = build(model_type, **overrides)
    save(hf, tmp_path)
    state = {k: v.clone().contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("block_sparse_moe.experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(tmp_path, dtype="float32")
    np.testing.assert_allclose(np.asarray(model([PROMPT])), hf_logits(hf, [PROMPT]).numpy(), atol=1e-4, rtol=0)


def test_experts_split_over_devices(tmp_path):
    """Granite with a shared expert and 8 experts on 2 and 4 CPU devices (tests/device_split.py), 4 and 2
    each: the single device's logits and greedy tokens, and one device gives transformers' logits."""
    hf = build("granitemoeshared", **{**CASES["granite-shared-mqa-top3-bias"][1], "num_local_experts": 8})
    assert_experts_split_equal(hf, tmp_path, n_experts=8)


def meta_count(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in T.AutoModelForCausalLM.from_config(cfg).parameters())


@pytest.mark.parametrize("name", list(REAL))
def test_real_shapes_count_as_transformers_and_ibm(name):
    """granite-3.1's real configs: the total is transformers' (meta device), and total / active are IBM's
    1.3 B / 400 M and 3.3 B / 800 M to their one decimal (`ibm_figures`)."""
    fields, published = REAL[name]
    cfg = T.GraniteMoeConfig(**fields)
    c = config_from_hf(cfg.to_dict())
    assert parameter_counts(c).total == meta_count(cfg)
    assert ibm_figures(c) == published


def ibm_figures(c) -> tuple[float, float]:
    """(total, active) in billions to one decimal as IBM counts them: active without the embedding table or
    the (tied) LM head (with the head, 3b-a800m's active would be 0.9 B)."""
    counts = parameter_counts(c)
    return round(counts.total / 1e9, 1), round((counts.active - c.vocab_size * c.d_model) / 1e9, 1)


def test_bench_shape_is_the_real_granite():
    """`moe bench granite-1b-a400m` writes granite-3.1-1b-a400m's layout and sizes."""
    shape = bench.SHAPES["granite-1b-a400m"]
    assert shape["model_type"] == "granitemoe"
    c = config_from_hf({**bench.COMMON, **shape})
    assert c == config_from_hf(T.GraniteMoeConfig(**REAL["granite-3.1-1b-a400m"][0]).to_dict())
    assert ibm_figures(c) == (1.3, 0.4)


def test_bench_checkpoint_loads_in_both_engines(monkeypatch, tmp_path):
    """The bench's random checkpoint of a (shrunk) granite shape: one tensor per parameter, the Hub's fused
    names only (`random_weights.checkpoint_names`), read alike by moecli and transformers."""
    small = dict(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2)
    monkeypatch.setitem(bench.SHAPES, "granite-tiny", {**bench.SHAPES["granite-1b-a400m"], **small})
    monkeypatch.setenv("MOECLI_CACHE", str(tmp_path / "cache"))
    folder = bench.write_synthetic("granite-tiny", "float32", shard_bytes=100_000)
    names = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.block_sparse_moe.input_linear.weight" in names and not any("experts." in n for n in names)
    hf = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours = np.asarray(load_model(folder, dtype="float32")([PROMPT]))
    np.testing.assert_allclose(ours, hf_logits(hf, [PROMPT]).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("edit, match", [({"logits_scaling": 0}, "logits_scaling|logits_scale"),
                                         ({"attention_multiplier": -1.0}, "attention_scale"),
                                         ({"embedding_multiplier": "12"}, "embedding_multiplier")])
def test_damaged_multipliers_are_one_config_error(edit, match):
    hf = build("granitemoe", **CASES["granite-odd-headdim-tied"][1]).config.to_dict()
    with pytest.raises(ConfigError, match=match):
        config_from_hf({**hf, **edit})
