"""GLM-4.5 (glm4_moe) and MiniMax-M2 (minimax_m2) against transformers on tiny random float32 models:
full-forward logits, 16 greedy tokens, cached decoding; partial rotary, q/k norm on and off, expert
groups, dense first layers, shared experts, the selection bias, multi-token-prediction layers in the
checkpoint (skipped), transformers 5's own tensor names, and the experts split over 2 CPU devices."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import (PROMPT, assert_cached_decoding_equals_full, assert_greedy_matches,
                       assert_logits_match, build, hf_logits, save)
from moecli import load_model
from moecli.checkpoints.families import config_from_hf, ignored_tensors
from moecli.errors import CheckpointError, ConfigError
from moecli.model.sizes import parameter_counts

GLM = dict(n_routed_experts=8, moe_intermediate_size=16, head_dim=16)
CASES = {
    # 3 layers, the first dense; 4 groups of 2 experts, 2 groups per token, top-3; 2 shared experts;
    # per-head q/k norm; q/k/v biases; RoPE on half of each head (the default); an MTP layer stored.
    "glm-groups-dense-shared-qknorm-mtp": ("glm4_moe", dict(
        GLM, num_hidden_layers=3, first_k_dense_replace=1, n_group=4, topk_group=2, num_experts_per_tok=3,
        n_shared_experts=2, use_qk_norm=True, attention_bias=True, routed_scaling_factor=2.5,
        num_nextn_predict_layers=1)),
    # no q/k norm, MQA, RoPE on a quarter of each head with yarn, no renormalisation, tied embeddings
    "glm-noqknorm-quarter-yarn-tied": ("glm4_moe", dict(
        GLM, first_k_dense_replace=0, num_key_value_heads=1, use_qk_norm=False, norm_topk_prob=False,
        tie_word_embeddings=True, num_nextn_predict_layers=0,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "rope_theta": 10000.0, "partial_rotary_factor": 0.25})),
    # the released configs' legacy rotary_dim; whole-projection q/k norm; an MTP module stored (declared
    # in config.json only, MINIMAX_MTP: transformers' generate would run it as a draft model)
    "minimax-rotary-dim-mtp": ("minimax_m2", dict(num_local_experts=6, head_dim=16, rotary_dim=8)),
    "minimax-top3-mha-full-rotary": ("minimax_m2", dict(num_local_experts=8, num_experts_per_tok=3, head_dim=8,
                                                        num_key_value_heads=4, rotary_dim=8)),
}
MINIMAX_MTP = {"use_mtp": True, "num_mtp_modules": 1}  # as the released config.json has them (3 there)
WORKER = str(Path(__file__).with_name("sharding_worker.py"))


def add_mtp_layer(folder: Path, hf) -> list[str]:
    """Append an MTP module as DeepSeek-V3-style checkpoints store it (transformers does not build it):
    model.layers.{n_layers}.* = a copy of the last decoder layer plus eh_proj, enorm, hnorm, shared_head;
    MiniMax-M2's config.json gets the fields that declare it."""
    if hf.config.model_type == "minimax_m2":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **MINIMAX_MTP}))
    path = folder / "model.safetensors"
    state = load_file(str(path))
    n, d, vocab = hf.config.num_hidden_layers, hf.config.hidden_size, hf.config.vocab_size
    last = f"model.layers.{n - 1}."
    extra = {f"model.layers.{n}." + k[len(last):]: v.clone() for k, v in state.items() if k.startswith(last)}
    extra.update({f"model.layers.{n}.eh_proj.weight": torch.randn(d, 2 * d), f"model.layers.{n}.enorm.weight":
                  torch.ones(d), f"model.layers.{n}.hnorm.weight": torch.ones(d),
                  f"model.layers.{n}.shared_head.norm.weight": torch.ones(d),
                  f"model.layers.{n}.shared_head.head.weight": torch.randn(vocab, d)})
    save_file({**state, **extra}, str(path), metadata={"format": "pt"})
    return sorted(extra)


_PAIRS: dict[str, tuple] = {}  # built once: test_each_feature_changes_the_logits reuses the parity pairs


def loaded_pair(case: str, tmp_path_factory) -> tuple:
    """(transformers model, moecli model) of CASES[case], loaded from the same saved checkpoint."""
    if case not in _PAIRS:
        model_type, overrides = CASES[case]
        hf = build(model_type, **overrides)
        folder = save(hf, tmp_path_factory.mktemp(case))
        if case.endswith("-mtp"):
            assert add_mtp_layer(folder, hf)
        _PAIRS[case] = hf, load_model(folder, dtype="float32")
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
    assert_cached_decoding_equals_full(pair[1])


def test_config_reads_the_features(pair):
    """Each case's config really turns on what it claims, and the parameter count is the model's and
    transformers' (its parameters plus the selection-bias buffers)."""
    hf, model = pair
    c, hc = model.config, hf.config
    rotary = int(c.head_dim * hc.rope_parameters["partial_rotary_factor"])
    assert c.router == "sigmoid_topk" and c.rotary_dim == (0 if rotary == c.head_dim else rotary)
    if hc.model_type == "glm4_moe":
        assert c.qk_norm == ("head" if hc.use_qk_norm else "none")
        assert c.moe_layers == tuple(i >= hc.first_k_dense_replace for i in range(c.n_layers))
        assert c.d_shared_expert == hc.n_shared_experts * hc.moe_intermediate_size and not c.shared_expert_gate
        assert (c.n_group, c.topk_group, c.routed_scaling_factor) == (hc.n_group, hc.topk_group, hc.routed_scaling_factor)
    else:
        assert c.qk_norm == "full" and c.d_shared_expert == 0 and all(c.moe_layers)
    buffers = sum(b.numel() for name, b in hf.named_buffers() if name.endswith("e_score_correction_bias"))
    assert buffers == sum(c.moe_layers) * c.n_experts
    assert parameter_counts(c).total == model.n_params == sum(p.numel() for p in hf.parameters()) + buffers


def far_from(model, hf, **changes) -> float:
    """Max |logits - transformers'| of `model` under changed settings (or with its selection bias zeroed)."""
    zero_bias = changes.pop("zero_bias", False)
    changed = model.with_config(**changes) if changes else copy.copy(model)  # the copy: its compiled forward
    if zero_bias:
        changed.params = jax.tree_util.tree_map_with_path(
            lambda path, x: x * 0 if "score_bias" in jax.tree_util.keystr(path) else x, model.params)
    return float(np.max(np.abs(np.asarray(changed([PROMPT])) - hf_logits(hf, [PROMPT]).numpy())))


@pytest.mark.parametrize("case", ["glm-groups-dense-shared-qknorm-mtp", "minimax-rotary-dim-mtp"])
def test_each_feature_changes_the_logits(case, tmp_path_factory):
    """The parity above is not vacuous: dropping partial rotary, the selection bias, the groups or the
    routed scaling each moves the logits far from transformers'."""
    model_type = CASES[case][0]
    hf, model = loaded_pair(case, tmp_path_factory)   # the parity tests' own (its MTP layer skipped)
    assert far_from(model, hf) < 1e-4
    assert far_from(model, hf, rotary_dim=0) > 1e-2
    assert far_from(model, hf, zero_bias=True) > 1e-2
    if model_type == "glm4_moe":
        assert far_from(model, hf, n_group=1, topk_group=1) > 1e-2
        assert far_from(model, hf, routed_scaling_factor=1.0) > 1e-2


@pytest.mark.parametrize("model_type, overrides", [CASES["glm-groups-dense-shared-qknorm-mtp"],
                                                   CASES["minimax-rotary-dim-mtp"]])
def test_transformers_state_dict_names(tmp_path, model_type, overrides):
    """transformers 5's own state dict (fused experts, minimax's mlp.e_score_correction_bias) loads too."""
    hf = build(model_type, **overrides)
    save(hf, tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    assert any(k.endswith("e_score_correction_bias") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(tmp_path, dtype="float32")
    np.testing.assert_allclose(np.asarray(model([PROMPT])), hf_logits(hf, [PROMPT]).numpy(), atol=1e-4, rtol=0)


def test_mtp_layers_are_skipped_only_when_declared(tmp_path):
    """The MTP tensors load only because config.json declares them: with num_nextn_predict_layers = 0
    the same tensors are unexpected."""
    hf = build("glm4_moe", **CASES["glm-groups-dense-shared-qknorm-mtp"][1])
    names = add_mtp_layer(save(hf, tmp_path), hf)
    assert names[0].startswith("model.layers.3.")
    load_model(tmp_path, dtype="float32")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.3\."):
        load_model(tmp_path, dtype="float32")


@pytest.mark.parametrize("edit, match", [
    ({"partial_rotary_factor": 1.5, "rope_parameters": None}, "rotary share"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.2}}, "must be even"),
    ({"num_nextn_predict_layers": 10**12}, "num_nextn_predict_layers"),
    ({"n_group": 3}, "n_group=3 must divide"),
    ({"n_shared_experts": -1}, "n_shared_experts"),
])
def test_damaged_glm_config_is_one_config_error(edit, match):
    hf = build("glm4_moe", **CASES["glm-noqknorm-quarter-yarn-tied"][1]).config.to_dict()
    with pytest.raises(ConfigError, match=match):
        ignored_tensors(config_from_hf({**hf, **edit}), {**hf, **edit})


@pytest.mark.parametrize("case", ["glm-groups-dense-shared-qknorm-mtp", "minimax-top3-mha-full-rotary"])
def test_experts_split_over_devices(tmp_path, case):
    """GLM (shared experts, groups) and MiniMax-M2, 8 experts each: 2 and 4 CPU devices
    (tests/sharding_worker.py) give the single device's logits and greedy tokens, and one device
    gives transformers' logits."""
    model_type, overrides = CASES[case]
    hf = build(model_type, **{**overrides, "first_k_dense_replace": 0} if model_type == "glm4_moe" else overrides)
    folder = save(hf, tmp_path / "ckpt")
    out = tmp_path / "devices.json"
    subprocess.run([sys.executable, WORKER, "devices", str(folder), str(out), "1,2,4"], check=True, timeout=600)
    result = json.loads(out.read_text())
    ids = [[1, 5, 9, 33, 7, 64, 2, 100, 17, 3], [4, 8, 15, 16, 23, 42, 99, 7, 1, 2]]  # the worker's
    base = np.array(result["1"]["logits"])
    np.testing.assert_allclose(base, hf_logits(hf, ids).numpy(), atol=1e-4, rtol=0)
    for n in (2, 4):
        np.testing.assert_allclose(np.array(result[str(n)]["logits"]), base, atol=1e-5, rtol=0)
        assert result[str(n)]["greedy"] == result["1"]["greedy"]
        assert result[str(n)]["devices_used"] == n
        assert [s[0] for s in result[str(n)]["expert_shard_shapes"]] == [8 // n] * n
