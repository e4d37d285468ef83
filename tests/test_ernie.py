"""ERNIE-4.5 MoE (ernie4_5_moe) against transformers on tiny random float32 models: full-forward logits,
16 greedy tokens, cached decoding; dense layers between the MoE ones (start / interval / end index), an
odd expert count, head_dim != hidden / heads, shared experts, the softmax router's selection bias,
moe_norm_min clamping the renormalisation, biases everywhere (`use_bias`, the LM head's too), interleaved
RoPE, tied and untied embeddings, transformers 5's own tensor names, and the experts split over 2 and 4 CPU
devices."""
from __future__ import annotations

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

ERNIE = dict(moe_intermediate_size=16, head_dim=12)
CASES = {
    # 6 layers, MoE at 1 and 3 only (start 1, every 2nd, up to 4: layer 5 would be MoE but for the end
    # index); 7 experts, top-2; 2 shared experts; moe_norm_min 0.9 (most tokens' top-2 sum less); biases
    # on every projection and the LM head; untied.
    "interval-end-bias-normmin-shared": dict(
        ERNIE, num_hidden_layers=6, moe_num_experts=7, moe_layer_start_index=1, moe_layer_interval=2,
        moe_layer_end_index=4, moe_num_shared_experts=2, moe_norm_min=0.9, use_bias=True, tie_word_embeddings=False),
    # every layer MoE (start 0), 5 experts, top-3, no shared expert, MQA, tied embeddings with an LM-head bias,
    # yarn RoPE
    "all-moe-top3-mqa-tied-yarn": dict(
        ERNIE, moe_num_experts=5, num_experts_per_tok=3, moe_layer_start_index=0, moe_num_shared_experts=0,
        num_key_value_heads=1, use_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "rope_theta": 10000.0}),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, moecli model) loaded from the same saved checkpoint."""
    hf = build("ernie4_5_moe", **CASES[request.param])
    return hf, load_model(save(hf, tmp_path_factory.mktemp(request.param)), dtype="float32")


def test_logits_match_transformers(pair):
    assert_logits_match(*pair)


def test_greedy_generation_matches_transformers(pair):
    assert_greedy_matches(*pair)


def test_incremental_decoding_equals_full_forward(pair):
    assert_cached_decoding_equals_full(pair[1])  # a 5-token prefill, then one token at a time


def test_config_reads_the_features(pair):
    """The MoE layers are transformers' sparse blocks, the features are on, and the parameter count is
    transformers' (the selection bias is a parameter there too)."""
    hf, model = pair
    c, hc = model.config, hf.config
    sparse = tuple(type(layer.mlp).__name__ == "Ernie4_5_MoeSparseMoeBlock" for layer in hf.model.layers)
    assert c.moe_layers == sparse and all(sparse) == (hc.moe_layer_start_index == 0)
    assert (c.router, c.selection_bias, c.rope_interleave, c.norm_min) == ("softmax_topk", True, True, hc.moe_norm_min)
    assert c.head_dim == 12 != c.d_model // c.n_heads and c.n_experts % 2 == 1
    assert c.d_shared_expert == hc.moe_num_shared_experts * hc.moe_intermediate_size and not c.shared_expert_gate
    assert c.qkv_bias == c.o_bias == c.mlp_bias == c.lm_head_bias == hc.use_bias
    total = parameter_counts(c).total
    assert total == model.n_params == sum(p.numel() for p in hf.parameters()) <= c.parameter_bound()


def far_from(model, hf, **changes) -> float:
    """Max |logits - transformers'| of `model` under changed settings (or with its selection bias zeroed)."""
    zero_bias = changes.pop("zero_bias", False)
    changed = model.with_config(**changes)
    if zero_bias:
        changed.params = jax.tree_util.tree_map_with_path(
            lambda path, x: x * 0 if "score_bias" in jax.tree_util.keystr(path) else x, model.params)
    return float(np.max(np.abs(np.asarray(changed([PROMPT])) - hf_logits(hf, [PROMPT]).numpy())))


def test_each_feature_changes_the_logits(tmp_path):
    """The parity above is not vacuous: rotate-half RoPE, no selection bias, or no norm_min clamp each
    moves the logits far from transformers'."""
    hf = build("ernie4_5_moe", **CASES["interval-end-bias-normmin-shared"])
    model = load_model(save(hf, tmp_path), dtype="float32")
    assert far_from(model, hf) < 1e-4
    assert far_from(model, hf, rope_interleave=False) > 1e-2
    assert far_from(model, hf, zero_bias=True) > 1e-2
    assert far_from(model, hf, norm_min=0.0) > 1e-2


def test_transformers_state_dict_names(tmp_path):
    """transformers 5's own state dict (fused experts, mlp.gate.moe_statics.e_score_correction_bias) loads too."""
    hf = build("ernie4_5_moe", **CASES["interval-end-bias-normmin-shared"])
    save(hf, tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    assert any(k.endswith("mlp.gate.moe_statics.e_score_correction_bias") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(tmp_path, dtype="float32")
    np.testing.assert_allclose(np.asarray(model([PROMPT])), hf_logits(hf, [PROMPT]).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("edit, match", [
    ({"moe_layer_interval": 0}, "moe_layer_interval"),
    ({"moe_norm_min": -1.0}, "norm_min"),
    ({"moe_num_experts": -3}, "moe_num_experts"),
    ({"moe_k": 9}, "top_k=9"),
])
def test_damaged_ernie_config_is_one_config_error(edit, match):
    hf = build("ernie4_5_moe", **CASES["all-moe-top3-mqa-tied-yarn"]).config.to_dict()
    with pytest.raises(ConfigError, match=match):
        config_from_hf({**hf, **edit})


def test_experts_split_over_devices(tmp_path):
    """8 experts (dense layers, shared experts, biases as above) over 2 and 4 CPU devices
    (tests/device_split.py), 4 and 2 each, give the single device's logits and greedy tokens, and one
    device gives transformers' logits."""
    hf = build("ernie4_5_moe", **{**CASES["interval-end-bias-normmin-shared"], "moe_num_experts": 8})
    assert_experts_split_equal(hf, tmp_path, n_experts=8)
