"""Llama-4 (llama4_text, and the multimodal llama4 checkpoint's text model) against transformers on tiny
random float32 models: full-forward logits, 16 greedy tokens, cached decoding, the parameter count; top-1
and top-2 sigmoid routing scaling the experts' inputs, the shared expert, dense layers between MoE ones,
chunked attention with a chunk shorter than the prompt, NoPE layers with the query temperature (a small
floor_scale, so it grows within the prompt), the weightless q/k norm, Llama 3.1's RoPE scaling, head_dim
!= hidden / heads, odd expert counts; the vision tower skipped (and said so); 2 and 4 CPU devices."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers

from device_split import assert_experts_split_equal
from hf_models import (PROMPT, assert_cached_decoding_equals_full, assert_greedy_matches, assert_logits_match,
                       BASE, build, hf_logits, redraw, save)
from moecli import load_model
from moecli.checkpoints.families import config_from_hf
from moecli.errors import ConfigError
from moecli.model.sizes import parameter_counts

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {
    # 4 layers: dense, MoE, dense, MoE (interleave_moe_layer_step 2, dense of intermediate_size_mlp); the
    # last layer NoPE (no_rope_interval 4) with temperature; chunks of 4 on the others; 3 experts, top-1;
    # head_dim 12 with hidden 32 / 4 heads; llama3 RoPE scaling
    "dense-chunk4-nope-temperature-llama3": dict(
        num_hidden_layers=4, head_dim=12, num_local_experts=3, num_experts_per_tok=1, intermediate_size=16,
        intermediate_size_mlp=24, interleave_moe_layer_step=2, attention_chunk_size=4, floor_scale=2,
        attn_scale=0.5, rope_parameters=LLAMA3_ROPE),
    # 3 layers, all MoE, top-2 of 5; NoPE in the middle (no_rope_layers), no chunks, no q/k norm, no
    # temperature; MQA; attention biases; tied embeddings
    "top2-moe-every-layer-no-chunk-tied": dict(
        num_hidden_layers=3, head_dim=8, num_key_value_heads=1, num_local_experts=5, num_experts_per_tok=2,
        intermediate_size=16, no_rope_layers=[1, 0, 1], attention_chunk_size=None, use_qk_norm=False,
        attn_temperature_tuning=False, attention_bias=True, tie_word_embeddings=True),
}


def with_gentle_routers(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Router weights ~ N(0, (1.5 / sqrt(d))^2): logits of a few units, far enough apart that the top-k is
    decisive, small enough that their sigmoids (the weights) are not all ~1, so whether they scale the
    experts' inputs or outputs shows in the logits."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.copy_(1.5 / math.sqrt(p.shape[-1]) * torch.randn(p.shape, generator=gen))
    return model


def build_llama4(case: str, **changes) -> transformers.PreTrainedModel:
    return with_gentle_routers(build("llama4_text", **{**CASES[case], **changes}), 0)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(transformers model, moecli model) loaded from the same saved checkpoint."""
    hf = build_llama4(request.param)
    return hf, load_model(save(hf, tmp_path_factory.mktemp(request.param)), dtype="float32")


def test_logits_match_transformers(pair):
    assert_logits_match(*pair)


def test_greedy_generation_matches_transformers(pair):
    assert_greedy_matches(*pair)


def test_incremental_decoding_equals_full_forward(pair):
    assert_cached_decoding_equals_full(pair[1])  # a 5-token prefill, then one token at a time


def test_config_reads_the_features_and_counts_transformers_parameters(pair):
    hf, model = pair
    c, hc = model.config, hf.config
    assert c.router == "topk_sigmoid" and c.router_scales_input and c.rope_interleave
    assert c.moe_layers == tuple(i in hc.moe_layers for i in range(c.n_layers))
    assert c.rope_layers == tuple(bool(r) for r in hc.no_rope_layers) and not all(c.rope_layers)
    assert c.chunk_layers == tuple(t == "chunked_attention" for t in hc.layer_types)
    assert c.attention_chunk == hc.attention_chunk_size and c.d_shared_expert == hc.intermediate_size
    assert c.qk_norm == ("l2" if hc.use_qk_norm else "none")
    assert c.temperature_floor == (hc.floor_scale if hc.attn_temperature_tuning else 0)
    assert parameter_counts(c).total == model.n_params == sum(p.numel() for p in hf.parameters())


def far_from(model, hf, **changes) -> float:
    """Max |logits - transformers'| of `model` under changed settings."""
    return float(np.max(np.abs(np.asarray(model.with_config(**changes)([PROMPT])) - hf_logits(hf, [PROMPT]).numpy())))


def test_each_feature_changes_the_logits(pair):
    """The parity above is not vacuous: each Llama-4 feature the case has, turned off, moves the logits."""
    hf, model = pair
    c = model.config
    assert far_from(model, hf) < 1e-4
    assert far_from(model, hf, router_scales_input=False) > 1e-2   # the weight on the outputs instead
    assert far_from(model, hf, rope_interleave=False) > 1e-2       # rotate-half pairs
    assert far_from(model, hf, rope_layers=()) > 1e-2              # RoPE on every layer
    if c.attention_chunk:
        assert far_from(model, hf, attention_chunk=None) > 1e-2
    if c.temperature_floor:
        assert far_from(model, hf, temperature_floor=0.0) > 1e-2
    if c.qk_norm == "l2":
        assert far_from(model, hf, qk_norm="none") > 1e-2
    if c.rope.kind == "llama3":
        assert far_from(model, hf, rope=c.rope.__class__(theta=c.rope.theta)) > 1e-2


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """A tiny Llama4ForConditionalGeneration (text model: the first case's) saved as the Hub ships Scout."""
    text = transformers.Llama4TextConfig(**{**BASE, **CASES["dense-chunk4-nope-temperature-llama3"]})
    vision = transformers.Llama4VisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, image_size=28, patch_size=14, vision_output_dim=16,
                                             projector_input_dim=16, projector_output_dim=16)
    torch.manual_seed(0)
    hf = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(
        text_config=text.to_dict(), vision_config=vision.to_dict()))
    hf.config._attn_implementation = "eager"
    hf.config.text_config._attn_implementation = "eager"
    redraw(hf, 0)
    with_gentle_routers(hf, 0).eval()
    folder = save(hf, tmp_path_factory.mktemp("llama4-multimodal"))
    return hf, folder


def test_multimodal_checkpoint_loads_its_text_model(multimodal):
    """`language_model.*` with `text_config`: transformers' text-only logits; the vision tower and the projector
    are skipped and the load notes (`moe generate --verbose`) say so."""
    hf, folder = multimodal
    names = json.loads((folder / "config.json").read_text())
    assert names["model_type"] == "llama4" and "text_config" in names
    model = load_model(folder, dtype="float32")
    assert model.config.family == "llama4" and model.config.n_layers == 4
    ids = np.array([PROMPT, PROMPT[::-1]])
    # the text model's logits (transformers 5.24's multimodal forward fails without pixel_values)
    np.testing.assert_allclose(np.asarray(model(ids)), hf_logits(hf.language_model, ids).numpy(), atol=1e-4, rtol=0)
    vision = sum(1 for name, _ in hf.named_parameters() if name.startswith("vision_model."))
    assert model.load_notes == (f"not loaded: 1 tensors of multi_modal_projector.*, {vision} tensors of vision_model.* "
                                "(the llama4 family declares them unused, as the vision tower and its projector: "
                                "moecli runs the text model only)",)
    text_params = sum(p.numel() for name, p in hf.named_parameters() if name.startswith("language_model."))
    assert parameter_counts(model.config).total == text_params


def test_text_model_tensors_are_unexpected_without_the_prefix(multimodal, tmp_path):
    """The multimodal config reads only `language_model.`-prefixed text tensors: a text-only checkpoint under
    a multimodal config.json is refused, not half loaded."""
    _, folder = multimodal
    text = transformers.Llama4TextConfig(**json.loads((folder / "config.json").read_text())["text_config"])
    assert config_from_hf(text.to_dict()).family == "llama4_text"
    hf = build_llama4("dense-chunk4-nope-temperature-llama3")
    save(hf, tmp_path)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(Exception, match="unexpected tensor|missing"):
        load_model(tmp_path, dtype="float32")


@pytest.mark.parametrize("edit, match", [
    ({"no_rope_layers": [1, 0]}, "no_rope_layers must have 4 entries"),
    ({"layer_types": ["sliding_attention"] * 4}, "layer_types hold only"),
    ({"interleave_moe_layer_step": 0}, "interleave_moe_layer_step"),
    ({"attention_chunk_size": 0}, "attention_chunk_size"),
    ({"rope_parameters": {**LLAMA3_ROPE, "low_freq_factor": 4.0}}, "low_freq_factor < high_freq_factor"),
    ({"rope_parameters": {k: v for k, v in LLAMA3_ROPE.items() if k != "factor"}}, "factor"),
])
def test_damaged_llama4_config_is_one_config_error(edit, match):
    hf = build_llama4("dense-chunk4-nope-temperature-llama3").config.to_dict()
    with pytest.raises(ConfigError, match=match):
        config_from_hf({**hf, **edit})


def test_experts_split_over_devices(tmp_path):
    """4 experts over 2 and 4 CPU devices (tests/device_split.py), 2 and 1 each: the single device's logits
    and greedy tokens, and one device gives transformers' logits."""
    hf = build_llama4("dense-chunk4-nope-temperature-llama3", num_local_experts=4)
    assert_experts_split_equal(hf, tmp_path, n_experts=4)
