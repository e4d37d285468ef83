"""The DeepSeek-V3 lineage (deepseek_v2, deepseek_v3 and kimi_k2, glm4_moe_lite) against transformers on
tiny random float32 models: multi-head latent attention with its cache of latents (absorbed decoding
against the expanded full forward), DeepSeekMoE's routers (V2's softmax greedy and group-limited, V3's
sigmoid with a selection bias and expert groups), shared experts, dense-first layers, YaRN's mscale;
the multi-token-prediction layers skipped at load; the experts over 2 and 4 devices."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hf_models import BASE, CONFIGS, PROMPT, assert_greedy_matches, assert_logits_match, build, hf_logits, save
from moecli import load_model
from moecli.checkpoints.families import config_from_hf
from moecli.errors import CheckpointError, ConfigError
from moecli.inference.engine import Model
from moecli.model.mla import LatentCache, absorbs
from moecli.model.ops import XLA
from moecli.model.sizes import parameter_counts

MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
           moe_intermediate_size=16)  # transformers' MLA needs as many key/value heads as heads
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, rope_theta=10000.0)

# Each case covers something a quick implementation would get wrong; SENSITIVE below checks it matters.
CASES = {
    "v3-qlora-groups-dense-first": ("deepseek_v3", dict(
        MLA, q_lora_rank=24, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
        first_k_dense_replace=1, n_shared_experts=2, num_hidden_layers=3)),
    "v3-q-proj-yarn-rotate-half-bias": ("deepseek_v3", dict(
        MLA, q_lora_rank=None, rope_interleave=False, attention_bias=True, n_routed_experts=6, n_group=1,
        topk_group=1, first_k_dense_replace=0, norm_topk_prob=False,
        rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=0.8))),
    "v2-lite-greedy": ("deepseek_v2", dict(
        MLA, q_lora_rank=None, n_routed_experts=6, n_shared_experts=2, first_k_dense_replace=1,
        num_hidden_layers=3, routed_scaling_factor=1.5)),
    "v2-group-limited-qlora-yarn": ("deepseek_v2", dict(
        MLA, q_lora_rank=20, topk_method="group_limited_greedy", n_group=4, topk_group=2, n_routed_experts=8,
        num_experts_per_tok=3, routed_scaling_factor=2.0, attention_bias=True,
        rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707))),
    # values as wide as keys: the expanded attention takes the C++ kernel on CPU, not the XLA path
    "glm-lite-equal-head-sizes": ("glm4_moe_lite", dict(
        MLA, v_head_dim=16, q_lora_rank=20, n_routed_experts=8, n_group=2, topk_group=1, num_hidden_layers=3,
        mlp_layer_types=["dense", "sparse", "sparse"])),
}



@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(case name, transformers model, moecli model) loaded from the same saved checkpoint."""
    model_type, overrides = CASES[request.param]
    hf = build(model_type, **overrides)
    folder = save(hf, tmp_path_factory.mktemp(request.param))
    return request.param, hf, load_model(folder, dtype="float32")


def test_logits_match_transformers(pair):
    assert_logits_match(*pair[1:])


def test_greedy_generation_matches_transformers(pair):
    assert_greedy_matches(*pair[1:])


def test_cached_decoding_equals_full_forward(pair):
    """Through the cache of latents: a short prefill and single tokens attend over the latents
    (absorbed), a chunk long enough expands keys and values from the cache; both equal the full forward
    (expanded). In the CPU backend's layout (keys transposed) and, for one case (the layout is the same
    code for every family), plain XLA's."""
    name, _, model = pair
    m = model.config.mla
    chunk = next(t for t in range(1, 512) if not absorbs(m, t))         # the first chunk size that expands
    assert absorbs(m, 1) and absorbs(m, 5) and chunk > 5
    ids = np.random.default_rng(0).integers(3, 128, size=(1, 5 + chunk + 4))
    xla = [Model(model.config, model.params, ops=XLA)] if name == "v3-qlora-groups-dense-first" else []
    for each in [model, *xla]:
        full = np.asarray(each(ids))
        cache = each.init_cache(batch=1, max_len=ids.shape[1] + 3)
        assert isinstance(cache.layers[0], LatentCache)
        steps = []
        for start, stop in [(0, 5), (5, 5 + chunk)] + [(t, t + 1) for t in range(5 + chunk, ids.shape[1])]:
            logits, cache = each.step(ids[:, start:stop], cache)
            steps.append(np.asarray(logits))
        np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=0)
        assert int(cache.pos) == ids.shape[1]


def test_cache_holds_the_latent_and_the_rope_key_only(pair):
    _, _, model = pair
    c, m = model.config, model.config.mla
    width = m.kv_lora_rank + m.qk_rope_head_dim
    for each in (model, Model(c, model.params, ops=XLA)):
        cache = each.init_cache(batch=2, max_len=24)
        for layer in cache.layers:
            assert isinstance(layer, LatentCache) and layer.kv.size == 2 * 24 * width
            assert layer.kv.shape == ((2, 1, width, 24) if each.ops.keys_transposed else (2, 1, 24, width))
    # what grouped-query attention would cache for the same heads: keys and values per head
    assert width < 2 * c.n_heads * m.v_head_dim


def test_parameter_counts(pair):
    """`parameter_counts` counts what the model holds: transformers' parameters plus the selection bias,
    which transformers keeps as a buffer."""
    _, hf, model = pair
    c = model.config
    assert parameter_counts(c).total == model.n_params
    buffers = sum(c.moe_layers) * c.n_experts if c.router == "sigmoid_topk" else 0
    assert model.n_params == sum(p.numel() for p in hf.parameters()) + buffers


def _zero_score_bias(model):
    return {m: {k: v * 0 if k == "score_bias" else v for k, v in g.items()} for m, g in model.params.items()}


def _mla(**changes):
    return lambda model: model.with_config(mla=dataclasses.replace(model.config.mla, **changes))


# Per case, changes that must break parity with transformers: the feature each case claims to cover is live.
SENSITIVE = {
    "v3-qlora-groups-dense-first": [lambda model: model.with_config(n_group=1, topk_group=1),
                                    lambda model: Model(model.config, _zero_score_bias(model), ops=model.ops)],
    "v3-q-proj-yarn-rotate-half-bias": [_mla(softmax_mscale=1.0), _mla(rope_interleave=True)],
    "v2-lite-greedy": [lambda model: model.with_config(routed_scaling_factor=1.0)],
    "v2-group-limited-qlora-yarn": [lambda model: model.with_config(n_group=1, topk_group=1),
                                    _mla(softmax_mscale=1.0)],
    "glm-lite-equal-head-sizes": [lambda model: Model(model.config, _zero_score_bias(model), ops=model.ops)],
}


def test_each_case_covers_what_it_claims(pair):
    name, hf, model = pair
    ids = np.array([PROMPT + PROMPT[::-1]])   # past YaRN's original 16 positions
    theirs = hf_logits(hf, ids).numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), theirs, atol=1e-4, rtol=0)
    for change in SENSITIVE[name]:
        assert np.max(np.abs(np.asarray(change(model)(ids)) - theirs)) > 1e-2


def hf_config(model_type: str, **overrides) -> dict:
    """config.json as transformers writes it for a tiny model of `model_type`."""
    return json.loads(CONFIGS[model_type](**{**BASE, **MLA, **overrides}).to_json_string())


def test_config_fields():
    v2 = hf_config("deepseek_v2", num_hidden_layers=6, first_k_dense_replace=1, n_routed_experts=4)
    assert config_from_hf({**v2, "moe_layer_freq": 2}).moe_layers == (False, False, True, False, True, False)
    assert config_from_hf(v2).moe_layers == (False,) + (True,) * 5
    assert config_from_hf(v2).mla.q_lora_rank == 1536                    # absent: transformers' default
    assert config_from_hf({**v2, "q_lora_rank": None}).mla.q_lora_rank == 0
    assert config_from_hf({**v2, "norm_topk_prob": True}).norm_topk_prob is False  # as transformers: never
    with pytest.raises(ConfigError, match="topk_method 'noaux_tc'"):
        config_from_hf({**v2, "topk_method": "noaux_tc"})
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        config_from_hf({**v2, "partial_rotary_factor": 0.5})
    with pytest.raises(ConfigError, match="mlp_bias"):
        config_from_hf({**v2, "mlp_bias": True})
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        config_from_hf({**v2, "kv_lora_rank": 0})
    glm = hf_config("glm4_moe_lite", num_hidden_layers=3, n_routed_experts=4)
    assert config_from_hf(glm).moe_layers == (False, True, True)
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        config_from_hf({**glm, "mlp_layer_types": ["dense", "sparse"]})
    kimi = config_from_hf({**hf_config("deepseek_v3", n_routed_experts=4, n_group=2, topk_group=1),
                           "model_type": "kimi_k2"})
    assert (kimi.family, kimi.attention, kimi.router, kimi.n_group) == ("kimi_k2", "mla", "sigmoid_topk", 2)


def test_kimi_k2_and_multi_token_prediction_layers(tmp_path, capsys):
    """A Kimi-K2 config.json (model_type kimi_k2, DeepSeek-V3's architecture) loads as DeepSeek-V3, and
    the multi-token-prediction layer stored after the last one (`num_nextn_predict_layers`, 1) is
    skipped, with a note for --verbose; a tensor of a layer past it is still an error."""
    from moecli.cli.commands.generate import print_stats
    from moecli.inference.text import GenerationStats

    hf = build("deepseek_v3", **CASES["v3-qlora-groups-dense-first"][1])
    save(hf, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["num_hidden_layers"] == 3
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "kimi_k2"}))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    mtp = {name.replace("model.layers.2.", "model.layers.3."): t for name, t in tensors.items()
           if name.startswith("model.layers.2.")}
    mtp.update({"model.layers.3.eh_proj.weight": np.zeros((32, 64), np.float32),
                "model.layers.3.enorm.weight": np.ones(32, np.float32)})
    save_file({**tensors, **mtp}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    model = load_model(tmp_path, dtype="float32")
    assert model.config.family == "kimi_k2"
    np.testing.assert_allclose(np.asarray(model([PROMPT])), hf_logits(hf, [PROMPT]).numpy(), atol=1e-4, rtol=0)
    assert model.load_notes == (f"not loaded: {len(mtp)} tensors of model.layers.3.* (the kimi_k2 family declares "
                                "them unused, as multi-token-prediction layers for speculative decoding, which "
                                "moecli does not do)",)
    print_stats(GenerationStats(), model)
    assert "not loaded: " in capsys.readouterr().err

    save_file({**tensors, **mtp, "model.layers.4.enorm.weight": np.ones(32, np.float32)},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.4.enorm.weight"):
        load_model(tmp_path, dtype="float32")


def test_experts_over_two_and_four_devices(tmp_path):
    """Experts split over 2 and 4 CPU devices in a subprocess (tests/sharding_worker.py) give the
    one-device logits and greedy tokens: groups, the selection bias, shared experts and a dense layer.
    (4 devices: one expert group each; 8, one expert each, is test_sharding.py's: routing is replicated.)"""
    hf = build("deepseek_v3", **CASES["v3-qlora-groups-dense-first"][1])
    folder = save(hf, tmp_path / "model")
    out = tmp_path / "devices.json"
    worker = str(Path(__file__).with_name("sharding_worker.py"))
    subprocess.run([sys.executable, worker, "devices", str(folder), str(out), "1,2,4"], check=True, timeout=900)
    result = json.loads(out.read_text())
    base = np.array(result["1"]["logits"])
    np.testing.assert_allclose(base, hf_logits(hf, IDS_OF_WORKER).numpy(), atol=1e-4)
    assert set(result) == {"1", "2", "4"}
    for n in ("2", "4"):
        np.testing.assert_allclose(np.array(result[n]["logits"]), base, atol=1e-5, rtol=0)
        assert result[n]["greedy"] == result["1"]["greedy"]
        assert [s[0] for s in result[n]["expert_shard_shapes"]] == [8 // int(n)] * int(n)


IDS_OF_WORKER = [[1, 5, 9, 33, 7, 64, 2, 100, 17, 3], [4, 8, 15, 16, 23, 42, 99, 7, 1, 2]]  # sharding_worker.IDS
