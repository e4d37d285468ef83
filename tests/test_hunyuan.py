"""Hunyuan-A13B (hunyuan_v1_moe) against transformers on tiny random float32 models: full-forward logits,
16 greedy tokens, cached decoding; the softmax router (`gate.wg`) with the always-on shared MLP, the weighted
per-head q/k RMSNorm after RoPE, NTK-alpha RoPE (and linear scaling), q/k/v/o biases, head_dim != hidden /
heads, odd expert counts, MQA, tied embeddings, per-layer list fields, transformers 5's own tensor names,
and the experts split over 2 and 4 CPU devices (the real model's parameter count: tests/test_sizes.py)."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import save_file

from device_split import assert_experts_split_equal
from hf_models import (PROMPT, assert_cached_decoding_equals_full, assert_greedy_matches, assert_logits_match,
                       build, hf_logits, save)
from moecli import load_model
from moecli.checkpoints.families import FAMILIES, config_from_hf
from moecli.errors import ConfigError
from moecli.model.config import RopeConfig
from moecli.model.sizes import parameter_counts

if "hunyuan_v1_moe" not in FAMILIES:  # registered once attention applies q/k norm "head_after_rope"
    pytest.skip("hunyuan_v1_moe is not registered in moecli.checkpoints.families yet", allow_module_level=True)

ALPHA_ROPE = {"rope_type": "dynamic", "alpha": 50.0, "factor": 1.0, "rope_theta": 10000.0}
CASES = {
    # 3 layers, 5 experts top-2, head_dim 12 (hidden 32 / 4 heads = 8), q/k/v/o biases, NTK-alpha RoPE
    "alpha-rope-bias-odd-headdim": dict(num_hidden_layers=3, num_experts=5, moe_topk=2, intermediate_size=24,
                                        head_dim=12, attention_bias=True, rope_parameters=ALPHA_ROPE),
    # 7 experts top-3, MQA, head_dim 16, tied embeddings, linear RoPE scaling
    "top3-mqa-tied-linear": dict(num_experts=7, moe_topk=3, intermediate_size=20, head_dim=16, num_key_value_heads=1,
                                 tie_word_embeddings=True,
                                 rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
}
_PAIRS: dict[str, tuple] = {}


def loaded_pair(case: str, tmp_path_factory) -> tuple:
    if case not in _PAIRS:
        hf = build("hunyuan_v1_moe", **CASES[case])
        _PAIRS[case] = hf, load_model(save(hf, tmp_path_factory.mktemp(case)), dtype="float32")
    return _PAIRS[case]


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, moecli model) loaded from the same saved checkpoint."""
    return loaded_pair(request.param, tmp_path_factory)


def test_logits_match_transformers(pair):
    assert_logits_match(*pair)


def test_greedy_generation_matches_transformers(pair):
    assert_greedy_matches(*pair)


def test_incremental_decoding_equals_full_forward(pair):
    assert_cached_decoding_equals_full(pair[1])  # a 5-token prefill, then one token at a time


def test_config_reads_the_features(pair):
    hf, model = pair
    c, hc = model.config, hf.config
    assert (c.router, c.qk_norm, c.norm_topk_prob, c.top_k, c.n_experts) == (
        "softmax_topk", "head_after_rope", True, hc.moe_topk, hc.num_experts)
    assert c.d_expert == c.d_shared_expert == hc.intermediate_size and not c.shared_expert_gate and all(c.moe_layers)
    assert c.qkv_bias == c.o_bias == hc.attention_bias and c.head_dim == hc.head_dim != c.d_model // c.n_heads
    assert parameter_counts(c).total == model.n_params == sum(p.numel() for p in hf.parameters())


def far_from(model, hf, **changes) -> float:
    return float(np.max(np.abs(np.asarray(model.with_config(**changes)([PROMPT])) - hf_logits(hf, [PROMPT]).numpy())))


def test_each_feature_changes_the_logits(tmp_path_factory):
    """The parity is not vacuous: the q/k norm before RoPE (Qwen3's order) or RoPE without alpha's larger base
    each moves the logits far from transformers'."""
    hf, model = loaded_pair("alpha-rope-bias-odd-headdim", tmp_path_factory)
    assert far_from(model, hf) < 1e-4
    assert far_from(model, hf, qk_norm="head") > 1e-2
    assert model.config.rope.theta == pytest.approx(1e4 * 50.0 ** (12 / 10))
    assert far_from(model, hf, rope=RopeConfig(theta=1e4)) > 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_state_dict_names(case, tmp_path):
    """transformers 5's own state dict (fused experts) loads too; save_pretrained writes one tensor per expert."""
    hf = build("hunyuan_v1_moe", **CASES[case])
    save(hf, tmp_path)
    state = {k: v.clone().contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(tmp_path, dtype="float32")
    np.testing.assert_allclose(np.asarray(model([PROMPT])), hf_logits(hf, [PROMPT]).numpy(), atol=1e-4, rtol=0)


def test_per_layer_lists_of_one_value_read_as_that_value():
    hf = build("hunyuan_v1_moe", **CASES["alpha-rope-bias-odd-headdim"]).config.to_dict()
    listed = {**hf, "num_experts": [5] * 3, "moe_topk": [2] * 3}
    assert config_from_hf(listed) == config_from_hf(hf)


@pytest.mark.parametrize("edit, match", [
    ({"num_experts": [5, 5, 6]}, "'num_experts' differs between layers"),
    ({"moe_topk": []}, "'moe_topk' differs between layers"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "without a fixed alpha"),
    ({"rope_parameters": {**ALPHA_ROPE, "alpha": -1.0}}, "alpha > 0"),
    ({"moe_topk": 9}, "top_k=9"),
])
def test_damaged_hunyuan_config_is_one_config_error(edit, match):
    hf = build("hunyuan_v1_moe", **CASES["alpha-rope-bias-odd-headdim"]).config.to_dict()
    with pytest.raises(ConfigError, match=match):
        config_from_hf({**hf, **edit})


def test_experts_split_over_devices(tmp_path):
    """8 experts (biases, NTK-alpha RoPE, the shared MLP) over 2 and 4 CPU devices (tests/device_split.py)."""
    hf = build("hunyuan_v1_moe", **{**CASES["alpha-rope-bias-odd-headdim"], "num_experts": 8})
    assert_experts_split_equal(hf, tmp_path, n_experts=8)
