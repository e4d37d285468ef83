"""config.json parsing and the loader's errors for missing, unexpected and mis-shaped tensors."""
from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hf_models import build, save
from moecli import load_model
from moecli.checkpoints.families import load_config
from moecli.errors import CheckpointError, ConfigError
from moecli.checkpoints.families import config_from_hf
from moecli.model.sizes import parameter_counts

MIXTRAL = dict(model_type="mixtral", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)


def test_unknown_model_type_lists_supported():
    with pytest.raises(ConfigError) as err:
        config_from_hf({**MIXTRAL, "model_type": "llama"})
    assert "llama" in str(err.value)
    for family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        assert family in err.value.hint


def test_rope_theta_top_level_and_rope_parameters_agree():
    old = config_from_hf({**MIXTRAL, "rope_theta": 5000.0})
    new = config_from_hf({**MIXTRAL, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}})
    assert old.rope.theta == new.rope.theta == 5000.0
    scaled = config_from_hf({**MIXTRAL, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert (scaled.rope.kind, scaled.rope.factor) == ("linear", 2.0)
    with pytest.raises(ConfigError, match="rope type"):
        config_from_hf({**MIXTRAL, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})


def test_hyperparameters_are_independent():
    c = config_from_hf({**MIXTRAL, "head_dim": 20})
    assert (c.d_model, c.n_heads, c.head_dim) == (32, 4, 20)
    q = config_from_hf({**MIXTRAL, "model_type": "qwen2_moe", "num_experts": 6, "moe_intermediate_size": 8,
                        "shared_expert_intermediate_size": 24, "decoder_sparse_step": 2,
                        "mlp_only_layers": [1], "num_hidden_layers": 4})
    assert q.moe_layers == (False, False, False, True)
    assert (q.d_ff, q.d_expert, q.d_shared_expert, q.qkv_bias) == (48, 8, 24, True)


def test_bad_field_type_is_config_error():
    with pytest.raises(ConfigError, match="hidden_size"):
        config_from_hf({**MIXTRAL, "hidden_size": "big"})
    with pytest.raises(ConfigError, match="num_local_experts"):
        config_from_hf({k: v for k, v in MIXTRAL.items() if k != "num_local_experts"})


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)


@pytest.fixture()
def checkpoint(tmp_path):
    return save(build("mixtral", num_local_experts=4), tmp_path)


def rewrite(folder, change):
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def test_missing_expert_tensor_is_named(checkpoint):
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    rewrite(checkpoint, lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as err:
        load_model(checkpoint, dtype="float32")
    assert name in str(err.value) and "(40, 32)" in str(err.value)


def test_unexpected_tensor_is_named(checkpoint):
    rewrite(checkpoint, lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match="model.layers.0.extra.weight"):
        load_model(checkpoint, dtype="float32")


def test_misshaped_tensor_names_expected_shape(checkpoint):
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite(checkpoint, lambda t: t.update({name: np.zeros((3, 32), np.float32)}))
    with pytest.raises(CheckpointError) as err:
        load_model(checkpoint, dtype="float32")
    assert name in str(err.value) and "(16, 32)" in str(err.value)


def test_missing_shard(tmp_path):
    save(build("mixtral", num_local_experts=4), tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=shard):
        load_model(tmp_path, dtype="float32")


def test_parameter_counts_match_transformers():
    for model_type, kw in [("mixtral", dict(num_local_experts=4, head_dim=12)),
                           ("qwen2_moe", dict(num_experts=4, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=20, mlp_only_layers=[0])),
                           ("qwen3_moe", dict(num_experts=4, moe_intermediate_size=16, attention_bias=True)),
                           ("olmoe", dict(num_experts=4))]:
        hf = build(model_type, **kw)
        ours = config_from_hf(hf.config.to_dict())
        assert parameter_counts(ours).total == sum(p.numel() for p in hf.parameters()), model_type


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])  # C copy, C widening, numpy
def test_placed_weights_are_the_transposed_checkpoint_and_adopted_without_a_copy(dtype):
    """copy_into transposes a checkpoint's [out, in] view exactly (tiled C copy or numpy), and an
    aligned contiguous array reaches the CPU device without a copy (the loader's memory peak)."""
    from moecli.checkpoints.placement import aligned_empty, copy_into, host_array

    src = np.random.default_rng(0).standard_normal((3, 70, 130)).astype(dtype)
    dst = aligned_empty((3, 130, 70), np.float32)
    assert dst.ctypes.data % 64 == 0
    copy_into(dst, np.swapaxes(src, -1, -2))
    np.testing.assert_array_equal(dst, np.swapaxes(src, -1, -2).astype(np.float32))
    assert host_array(dst, np.float32) is dst
    if jax.default_backend() == "cpu":
        assert jax.device_put(dst, jax.devices()[0]).unsafe_buffer_pointer() == dst.ctypes.data
    converted = host_array(np.swapaxes(src, -1, -2), np.float32)
    np.testing.assert_array_equal(converted, dst)
