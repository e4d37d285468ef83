"""moecli against Hugging Face transformers on tiny random models of every supported family:
full-forward logits, greedy generation, and KV-cached incremental decoding."""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import save_file

from hf_models import (PROMPT, assert_cached_decoding_equals_full, assert_greedy_matches,
                       assert_logits_match, build, hf_logits, save)
from moecli import load_model

# Each case covers something a quick implementation would get wrong.
CASES = {
    "mixtral-gqa-headdim": ("mixtral", dict(num_local_experts=4, head_dim=12)),
    "mixtral-mqa-top1-odd-tied": ("mixtral", dict(num_local_experts=3, num_experts_per_tok=1,
                                                  num_key_value_heads=1, tie_word_embeddings=True)),
    "mixtral-top3-window": ("mixtral", dict(num_local_experts=5, num_experts_per_tok=3, sliding_window=5)),
    "qwen2-shared-sparse-step": ("qwen2_moe", dict(
        num_hidden_layers=4, num_experts=4, moe_intermediate_size=24, shared_expert_intermediate_size=36,
        decoder_sparse_step=2, mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen2-normtopk": ("qwen2_moe", dict(num_experts=6, moe_intermediate_size=16,
                                        shared_expert_intermediate_size=20, norm_topk_prob=True)),
    "qwen3-headdim-mlp-only": ("qwen3_moe", dict(
        num_hidden_layers=3, num_experts=5, moe_intermediate_size=24, head_dim=16, mlp_only_layers=[0],
        norm_topk_prob=True, attention_bias=True)),
    "qwen3-top3-yarn": ("qwen3_moe", dict(
        num_experts=7, num_experts_per_tok=3, moe_intermediate_size=20, norm_topk_prob=False,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "rope_theta": 10000.0})),
    "olmoe-clip": ("olmoe", dict(num_experts=6, clip_qkv=1.5, norm_topk_prob=False)),
    "olmoe-normtopk-mha": ("olmoe", dict(num_experts=4, num_key_value_heads=4, norm_topk_prob=True)),
}



@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, moecli model) loaded from the same saved checkpoint."""
    model_type, overrides = CASES[request.param]
    hf = build(model_type, **overrides)
    folder = save(hf, tmp_path_factory.mktemp(request.param))
    return hf, load_model(folder, dtype="float32")


def test_logits_match_transformers(pair):
    assert_logits_match(*pair)


def test_greedy_generation_matches_transformers(pair):
    assert_greedy_matches(*pair)


def test_incremental_decoding_equals_full_forward(pair):
    assert_cached_decoding_equals_full(pair[1])


def test_sharded_checkpoint(tmp_path):
    hf = build("qwen2_moe", num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=20)
    save(hf, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = load_model(tmp_path, dtype="float32")
    np.testing.assert_allclose(np.asarray(model([PROMPT])), hf_logits(hf, [PROMPT]).numpy(), atol=1e-4)


def test_fused_expert_tensors(tmp_path):
    """transformers' own state dict stores experts fused (experts.gate_up_proj [E, 2F, D],
    experts.down_proj [E, D, F]); checkpoints written that way load too."""
    hf = build("mixtral", num_local_experts=4)
    save(hf, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    model = load_model(tmp_path, dtype="float32")
    np.testing.assert_allclose(np.asarray(model([PROMPT])), hf_logits(hf, [PROMPT]).numpy(), atol=1e-4)


def test_bfloat16_weights_close(tmp_path):
    hf = build("mixtral", num_local_experts=4)
    save(hf, tmp_path)
    model = load_model(tmp_path, dtype="bfloat16")
    assert model.dtype == np.dtype("bfloat16") or str(model.dtype) == "bfloat16"
    ours = np.asarray(model([PROMPT]))
    assert ours.dtype == np.float32
    theirs = hf_logits(hf, [PROMPT]).numpy()
    # bf16 weights keep ~3 significant digits; the argmax should mostly survive.
    assert np.mean(ours.argmax(-1) == theirs.argmax(-1)) >= 0.75
    assert np.max(np.abs(ours - theirs)) < 0.1 * np.max(np.abs(theirs)) + 0.5
