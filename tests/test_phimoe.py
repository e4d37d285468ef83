"""Phi-3.5-MoE (phimoe) against transformers on tiny random float32 models: full-forward logits, 16 greedy
tokens, cached decoding; SparseMixer routing with a wide jitter band, LayerNorm with biases, q/k/v/o and
LM-head biases, LongRoPE, a sliding window, an odd expert count, head_dim != hidden / heads, transformers
5's own tensor names, and the experts split over 2 and 4 CPU devices."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import save_file

from device_split import assert_experts_split_equal
from hf_models import (PROMPT, assert_cached_decoding_equals_full, assert_greedy_matches, assert_logits_match,
                       build, hf_logits, save)
from moecli import load_model
from moecli.checkpoints.families import config_from_hf
from moecli.errors import ConfigError
from moecli.model.sizes import parameter_counts

RNG = np.random.default_rng(0)
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": (1 + 3 * RNG.random(6)).tolist(),
            "long_factor": (1 + 8 * RNG.random(6)).tolist(), "short_mscale": 1.2, "long_mscale": 1.2,
            "original_max_position_embeddings": 64}
CASES = {
    # 3 layers, 5 experts, head_dim 12 (hidden 32 / 4 heads = 8), biases everywhere, a jitter band of 0.3
    # (many tokens' softmax spans several experts), LongRoPE with 6 per-frequency factors and mscale 1.2
    "longrope-bias-jitter-odd": dict(num_hidden_layers=3, num_local_experts=5, head_dim=12, attention_bias=True,
                                     lm_head_bias=True, router_jitter_noise=0.3, rope_parameters=LONGROPE),
    # plain RoPE, multi-head attention, a 6-token sliding window (the 12-token prompt crosses it), no biases
    "window-mha-default-rope": dict(num_local_experts=4, num_key_value_heads=4, sliding_window=6),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, moecli model) loaded from the same saved checkpoint."""
    hf = build("phimoe", **CASES[request.param])
    return hf, load_model(save(hf, tmp_path_factory.mktemp(request.param)), dtype="float32")


def test_logits_match_transformers(pair):
    assert_logits_match(*pair)


def test_greedy_generation_matches_transformers(pair):
    assert_greedy_matches(*pair)


def test_incremental_decoding_equals_full_forward(pair):
    assert_cached_decoding_equals_full(pair[1])  # a 5-token prefill, then one token at a time


def test_config_reads_the_features(pair):
    hf, model = pair
    c, hc = model.config, hf.config
    assert (c.router, c.norm, c.top_k, c.sparsemixer_eps) == ("sparsemixer", "layer", 2, hc.router_jitter_noise)
    assert c.qkv_bias == c.o_bias == hc.attention_bias and c.lm_head_bias == hc.lm_head_bias
    assert c.sliding_window == hc.sliding_window
    assert c.rope.kind == ("longrope" if hc.rope_parameters["rope_type"] == "longrope" else "default")
    total = parameter_counts(c).total
    assert total == model.n_params == sum(p.numel() for p in hf.parameters()) <= c.parameter_bound()


def far_from(model, hf, **changes) -> float:
    changed = model.with_config(**changes)
    return float(np.max(np.abs(np.asarray(changed([PROMPT])) - hf_logits(hf, [PROMPT]).numpy())))


def test_each_feature_changes_the_logits(tmp_path):
    """The parity above is not vacuous: no jitter band (a softmax over the chosen expert alone), plain RoPE
    instead of LongRoPE, or RMSNorm instead of LayerNorm each moves the logits far from transformers'."""
    hf = build("phimoe", **CASES["longrope-bias-jitter-odd"])
    model = load_model(save(hf, tmp_path), dtype="float32")
    assert far_from(model, hf) < 1e-4
    assert far_from(model, hf, sparsemixer_eps=0.0) > 1e-2
    assert far_from(model, hf, rope=model.config.rope.__class__(theta=model.config.rope.theta)) > 1e-2
    assert far_from(model, hf, norm="rms") > 1e-2


def test_transformers_state_dict_names(tmp_path):
    """transformers 5's own state dict (mlp.router, fused experts) loads too."""
    hf = build("phimoe", **CASES["longrope-bias-jitter-odd"])
    save(hf, tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.router.weight") for k in state) and any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(tmp_path, dtype="float32")
    np.testing.assert_allclose(np.asarray(model([PROMPT])), hf_logits(hf, [PROMPT]).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("edit, match", [
    ({"num_experts_per_tok": 3}, "chooses 2 experts"),
    ({"rope_parameters": {**LONGROPE, "short_factor": [1.0] * 5}}, "6 numbers"),
    ({"rope_parameters": {**LONGROPE, "long_mscale": 1.5}}, "different short and long mscales"),
    ({"rope_parameters": {**LONGROPE, "short_factor": [1.0] * 5 + [0.0]}}, "positive rescale factors"),
    ({"router_jitter_noise": -0.1}, "sparsemixer_eps"),
])
def test_damaged_phimoe_config_is_one_config_error(edit, match):
    hf = build("phimoe", **CASES["longrope-bias-jitter-odd"]).config.to_dict()
    with pytest.raises(ConfigError, match=match):
        config_from_hf({**hf, **edit})


def test_experts_split_over_devices(tmp_path):
    """4 experts (LongRoPE, biases, the jitter band) over 2 and 4 CPU devices (tests/device_split.py), 2 and
    1 each, give the single device's logits and greedy tokens, and one device gives transformers' logits."""
    hf = build("phimoe", **{**CASES["longrope-bias-jitter-odd"], "num_local_experts": 4})
    assert_experts_split_equal(hf, tmp_path, n_experts=4)
