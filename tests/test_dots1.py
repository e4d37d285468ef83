"""dots.llm1 (dots1) against transformers on tiny random float32 models: full-forward logits, 16 greedy
tokens, cached decoding (across a sliding window shorter than the prompt); DeepSeek-V3's sigmoid router with
its selection bias, expert groups and routed scaling, shared experts, dense first layers, Qwen3's per-head
q/k norm with q/k/v/o biases, head_dim != hidden / heads, odd expert counts, MQA, tied embeddings, yarn;
transformers 5's own tensor names, and the experts split over 2 and 4 CPU devices (the real model's
parameter count: tests/test_sizes.py)."""
from __future__ import annotations

import copy

import jax
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

DOTS = dict(moe_intermediate_size=16, head_dim=12)
CASES = {
    # 3 layers, the first dense; 6 experts in 3 groups of 2, 2 groups per token, top-3; 2 shared experts;
    # scaled and renormalised weights; q/k/v/o biases; a 6-token window on layers 1 and 2 (max_window_layers 1)
    "groups-dense-shared-bias-window": ("dots1", dict(
        DOTS, num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=6, n_group=3, topk_group=2,
        num_experts_per_tok=3, n_shared_experts=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        attention_bias=True, sliding_window=6, max_window_layers=1)),
    # every layer MoE, 5 experts top-2 without renormalising, one shared expert, MQA, head_dim 16, tied
    # embeddings, yarn RoPE, no window
    "odd-mqa-unnormalised-tied-yarn": ("dots1", dict(
        DOTS, head_dim=16, first_k_dense_replace=0, n_routed_experts=5, n_shared_experts=1, norm_topk_prob=False,
        num_key_value_heads=1, tie_word_embeddings=True, sliding_window=None,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "rope_theta": 10000.0})),
}
# rednote-hilab/dots.llm1.inst's config.json (the fields Dots1Config's defaults lack or differ in)
DOTS_LLM1 = dict(hidden_size=4096, n_routed_experts=128, n_shared_experts=2, num_experts_per_tok=6,
                 first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                 max_position_embeddings=32768, sliding_window=None)

_PAIRS: dict[str, tuple] = {}  # built once: test_each_feature_changes_the_logits reuses the parity pairs


def loaded_pair(case: str, tmp_path_factory) -> tuple:
    if case not in _PAIRS:
        model_type, overrides = CASES[case]
        hf = build(model_type, **overrides)
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
    assert_cached_decoding_equals_full(pair[1], chunks=((0, 3), (3, 8)))  # the second chunk crosses the window


def test_config_reads_the_features(pair):
    """Each case's config turns on what it claims; the parameter count is transformers' (its parameters plus
    the selection-bias buffers)."""
    hf, model = pair
    c, hc = model.config, hf.config
    assert (c.router, c.qk_norm, c.qkv_bias, c.o_bias) == ("sigmoid_topk", "head", hc.attention_bias, hc.attention_bias)
    assert c.head_dim != c.d_model // c.n_heads and c.moe_layers == tuple(
        i >= hc.first_k_dense_replace for i in range(c.n_layers))
    assert c.d_shared_expert == hc.n_shared_experts * hc.moe_intermediate_size and not c.shared_expert_gate
    assert (c.n_group, c.topk_group, c.routed_scaling_factor, c.norm_topk_prob) == (
        hc.n_group, hc.topk_group, hc.routed_scaling_factor, hc.norm_topk_prob)
    assert c.sliding_window == hc.sliding_window
    assert not hc.sliding_window or c.sliding_layers == tuple(t == "sliding_attention" for t in hc.layer_types)
    buffers = sum(b.numel() for name, b in hf.named_buffers() if name.endswith("e_score_correction_bias"))
    assert buffers == sum(c.moe_layers) * c.n_experts
    assert parameter_counts(c).total == model.n_params == sum(p.numel() for p in hf.parameters()) + buffers


def far_from(model, hf, **changes) -> float:
    """Max |logits - transformers'| of `model` under changed settings (or with its selection bias zeroed)."""
    zero_bias = changes.pop("zero_bias", False)
    changed = model.with_config(**changes) if changes else copy.copy(model)
    if zero_bias:
        changed.params = jax.tree_util.tree_map_with_path(
            lambda path, x: x * 0 if "score_bias" in jax.tree_util.keystr(path) else x, model.params)
    return float(np.max(np.abs(np.asarray(changed([PROMPT])) - hf_logits(hf, [PROMPT]).numpy())))


def test_each_feature_changes_the_logits(tmp_path_factory):
    """The parity is not vacuous: dropping the window, the selection bias, the groups, the routed scaling or
    the q/k norm each moves the logits far from transformers'."""
    hf, model = loaded_pair("groups-dense-shared-bias-window", tmp_path_factory)
    assert far_from(model, hf) < 1e-4
    assert far_from(model, hf, sliding_window=None, sliding_layers=()) > 1e-2
    assert far_from(model, hf, zero_bias=True) > 1e-2
    assert far_from(model, hf, n_group=1, topk_group=1) > 1e-2
    assert far_from(model, hf, routed_scaling_factor=1.0) > 1e-2
    unnormed = model.with_config(qk_norm="none")
    unnormed.params = {k: v for k, v in model.params.items() if not k.endswith(("q_norm", "k_norm"))}
    assert float(np.max(np.abs(np.asarray(unnormed([PROMPT])) - hf_logits(hf, [PROMPT]).numpy()))) > 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_state_dict_names(case, tmp_path):
    """transformers 5's own state dict (fused experts, mlp.gate.e_score_correction_bias) loads too."""
    hf = build(*CASES[case][:1], **CASES[case][1])
    save(hf, tmp_path)
    state = {k: v.clone().contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    assert any(k.endswith("mlp.gate.e_score_correction_bias") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(tmp_path, dtype="float32")
    np.testing.assert_allclose(np.asarray(model([PROMPT])), hf_logits(hf, [PROMPT]).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("edit, match", [
    ({"n_group": 4}, "n_group=4 must divide"),
    ({"n_shared_experts": -1}, "n_shared_experts"),
    ({"layer_types": ["full_attention"]}, "layer_types has 1 entries"),
])
def test_damaged_dots1_config_is_one_config_error(edit, match):
    hf = build("dots1", **CASES["groups-dense-shared-bias-window"][1]).config.to_dict()
    with pytest.raises(ConfigError, match=match):
        config_from_hf({**hf, **edit})


def test_experts_split_over_devices(tmp_path):
    """8 experts in 4 groups (dense first layer, shared experts, biases, the window) over 2 and 4 CPU devices
    (tests/device_split.py): the single device's logits and greedy tokens."""
    overrides = {**CASES["groups-dense-shared-bias-window"][1], "n_routed_experts": 8, "n_group": 4}
    assert_experts_split_equal(build("dots1", **overrides), tmp_path, n_experts=8)
