"""Parameter counts, stored weight bytes and KV-cache bytes from config.json alone (`moecli.model.sizes`,
`moecli.checkpoints.stored_size`, `moe info`), against transformers, the checkpoints' own files and the
publishers' figures.

The real configs are transformers 5.24's config classes (their defaults, or a released config's fields
where the defaults are not a released model), counted by transformers itself on the meta device:
moecli's total must be transformers' parameters plus the routers' selection bias, which transformers
keeps as a buffer (`e_score_correction_bias`) and moecli as a parameter. transformers builds no
multi-token-prediction layer (DeepSeek-V3's layer 61, GLM-4.5-Air's layer 46, MiniMax-M2's MTP
modules) and moecli loads none, so neither total has one.

Publishers count active parameters three ways, and each figure is compared in its publisher's:
"embedding" (everything a token touches, the embedding table included: Mistral, Qwen, OLMoE),
"openai" (the LM head but not the embedding table: OpenAI's gpt-oss, DeepSeek; moecli's own,
`ACTIVE_CONVENTION`), "neither" (no embedding table and no LM head: GLM, MiniMax).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from safetensors.numpy import save_file
from typer.testing import CliRunner

from hf_models import build, save
from test_fp8 import DEEPSEEK, fp8_checkpoint
from test_mxfp4 import CONFIG as GPT_OSS_MXFP4, save_mxfp4
from test_granite import REAL as GRANITE
from test_dots1 import DOTS_LLM1
from moecli.checkpoints.families import FAMILIES, config_from_hf, load_config, read_config_json
from moecli.checkpoints.quantize import quantize_checkpoint
from moecli.checkpoints.safetensors import check_safetensors, safetensors_files
from moecli.checkpoints import compressed_tensors as ct
from moecli.checkpoints.stored_size import _compressed, stored_weights
from moecli.model.config import QuantConfig
from moecli.model.sizes import (ACTIVE_CONVENTION, CacheLayers, cache_bytes_at, kv_cache_bytes, parameter_counts,
                                parameter_shapes)

QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False)
DEEPSEEK_V2_LITE = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
                        n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512,
                        q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)

# tencent/Hunyuan-A13B-Instruct's config.json (its per-layer lists of one value written as that value)
HUNYUAN_A13B = dict(vocab_size=128167, hidden_size=4096, intermediate_size=3072, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_experts=64, moe_topk=8,
                    tie_word_embeddings=True, max_position_embeddings=32768,
                    rope_parameters={"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0})

# name: (config, published (total, active) in billions or None, the publisher's active convention)
CASES = {
    "mixtral-8x7b": (lambda: T.MixtralConfig(), (46.7, 12.9), "embedding"),
    "qwen1.5-moe-a2.7b": (lambda: T.Qwen2MoeConfig(), (14.3, 2.7), "embedding"),
    "qwen3-30b-a3b": (lambda: T.Qwen3MoeConfig(**QWEN3_30B_A3B), (30.5, 3.3), "embedding"),
    "olmoe-1b-7b": (lambda: T.OlmoeConfig(vocab_size=50304, intermediate_size=1024), (6.9, 1.3), "embedding"),
    "gpt-oss-20b": (lambda: T.GptOssConfig(num_hidden_layers=24, num_local_experts=32), (20.9, 3.6), "openai"),
    "gpt-oss-120b": (lambda: T.GptOssConfig(), (116.8, 5.1), "openai"),
    "deepseek-v2-lite": (lambda: T.DeepseekV2Config(**DEEPSEEK_V2_LITE), (15.7, 2.4), "openai"),
    "deepseek-v3": (lambda: T.DeepseekV3Config(), (671, 37), "openai"),
    # GLM-4.5-Air's config.json sets head_dim 128 and attention_bias, which Glm4MoeConfig's defaults lack
    "glm-4.5-air": (lambda: T.Glm4MoeConfig(head_dim=128, attention_bias=True), (106, 12), "neither"),
    "glm-4.7-flash": (lambda: T.Glm4MoeLiteConfig(), None, None),
    "minimax-m2": (lambda: T.MiniMaxM2Config(), (230, 10), "neither"),
    # Llama-4-Scout's text model (Llama4TextConfig's defaults): Meta's 109 B total counts the vision tower too
    "llama4-scout": (lambda: T.Llama4TextConfig(), (107.8, 17), "embedding"),
    # ERNIE-4.5-21B-A3B: transformers' defaults; Baidu's model card says 21 B total, 3 B active
    "ernie-4.5-21b-a3b": (lambda: T.Ernie4_5_MoeConfig(), (21.8, 3.0), "neither"),
    # Phi-3.5-MoE: its config.json has attention and LM-head biases; 41.9 B total, 6.6 B active (model card)
    "phi-3.5-moe": (lambda: T.PhimoeConfig(attention_bias=True, lm_head_bias=True), (41.9, 6.6), "embedding"),
    # Qwen3-Next-80B-A3B: transformers' defaults, 79.7 B (tests/test_qwen3_next.py); "A3B" is rounder than any convention
    "qwen3-next-80b-a3b": (lambda: T.Qwen3NextConfig(), None, None),
    # granite-3.1's config.json (tests/test_granite.py); IBM's "1b-a400m" (1.33 B, 0.38 B) is rounder than 2-3 %
    "granite-3.1-1b-a400m": (lambda: T.GraniteMoeConfig(**GRANITE["granite-3.1-1b-a400m"][0]), None, None),
    "granite-3.1-3b-a800m": (lambda: T.GraniteMoeConfig(**GRANITE["granite-3.1-3b-a800m"][0]), (3.3, 0.8), "neither"),
    # dots.llm1.inst's config.json (tests/test_dots1.py); rednote's model card: 142 B total, 14 B active
    "dots.llm1": (lambda: T.Dots1Config(**DOTS_LLM1), (142, 14), "embedding"),
    # Hunyuan-A13B-Instruct: Tencent's model card says 80 B total, 13 B active (skipped until registered)
    "hunyuan-a13b": (lambda: T.HunYuanMoEV1Config(**HUNYUAN_A13B), (80, 13), "embedding"),
}


def hf_config(case: str):
    cfg = CASES[case][0]()
    if cfg.model_type not in FAMILIES:
        pytest.skip(f"model_type {cfg.model_type!r} is not registered in moecli.checkpoints.families yet")
    return cfg


def transformers_count(cfg) -> int:
    """transformers' parameters of the model `cfg` describes (built on the meta device: no memory),
    plus the selection-bias buffers moecli holds as parameters."""
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(cfg)
    buffers = sum(b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
    return sum(p.numel() for p in model.parameters()) + buffers


@pytest.mark.parametrize("case", list(CASES))
def test_the_total_is_transformers_count(case):
    cfg = hf_config(case)
    c = config_from_hf(cfg.to_dict())
    total = parameter_counts(c).total
    assert total == transformers_count(cfg)
    assert total <= c.parameter_bound() <= 16 * total  # ModelConfig's cheap sanity bound: above, not absurdly


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1]])
def test_the_counts_are_near_the_published_figures(case):
    cfg = hf_config(case)
    c = config_from_hf(cfg.to_dict())
    counts = parameter_counts(c)
    (total, active), convention = CASES[case][1:]
    head = c.vocab_size * c.d_model
    theirs = counts.active + {"embedding": counts.embedding, "openai": 0, "neither": -head}[convention]
    assert counts.total == pytest.approx(total * 1e9, rel=0.02)
    assert theirs == pytest.approx(active * 1e9, rel=0.03)


def test_glm_air_with_its_mtp_layer_is_the_hub_count():
    """GLM-4.5-Air's 106 B is without its multi-token-prediction layer; the Hub's files hold it as layer 46:
    one more MoE decoder layer, eh_proj [2d -> d] and three norms (enorm, hnorm, shared_head.norm; the
    embedding and head are the model's), 110 B in all as the Hub counts the safetensors files."""
    c = config_from_hf(hf_config("glm-4.5-air").to_dict())
    more = c.replace(n_layers=c.n_layers + 1, moe_layers=c.moe_layers + (True,))
    mtp = parameter_counts(more).total - parameter_counts(c).total + 2 * c.d_model ** 2 + 3 * c.d_model
    assert parameter_counts(c).total + mtp == pytest.approx(110e9, rel=0.015)


def test_the_bundled_model_counts_as_its_model_card_says():
    counts = parameter_counts(load_config(Path(__file__).resolve().parent.parent / "weights" / "bardmoe"))
    assert counts == (8_314_560, 2_612_928, 393_216)
    assert ACTIVE_CONVENTION == "LM head included, embedding table not"


@pytest.mark.parametrize("tied", [False, True])
def test_active_leaves_out_the_experts_not_chosen_and_the_embedding_table(tied):
    """Against transformers' own parameters: routed experts counted top_k / n_experts, the embedding
    table left out unless it is the LM head too."""
    hf = build("qwen2_moe", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
               shared_expert_intermediate_size=24, mlp_only_layers=[1], tie_word_embeddings=tied)
    named = dict(hf.named_parameters())
    experts = sum(p.numel() for name, p in named.items() if ".experts." in name)
    embedding = 0 if tied else named["model.embed_tokens.weight"].numel()
    total = sum(p.numel() for p in named.values())
    counts = parameter_counts(config_from_hf(hf.config.to_dict()))
    assert experts and counts == (total, total - experts * 4 // 6 - embedding, embedding)


def logical_weights(shapes: dict) -> int:
    """The weights a (possibly packed) parameter tree stands for, from the packed shapes themselves:
    q4 integers and MXFP4 blocks hold two a byte, scales none (`moecli.model.quant`, `moecli.model.mxfp4`)."""
    n = 0
    for group in shapes.values():
        for param, s in group.items():
            if param.endswith(("_scale", "_scales")):
                continue
            n += math.prod(s.shape) * (2 if param.endswith("_blocks") or (param.endswith("_q") and s.dtype == jnp.uint8)
                                       else 1)
    return n


@pytest.mark.parametrize("stored", [QuantConfig.preset(4), QuantConfig.preset(8),
                                    QuantConfig(experts=4, experts_format="mxfp4")], ids=["q4", "q8", "mxfp4"])
def test_quantized_weights_count_as_the_weights_they_stand_for(stored):
    c = config_from_hf(build("gpt_oss", **GPT_OSS_MXFP4).config.to_dict()).replace(quant=stored)
    packed = parameter_shapes(c)
    elements = sum(math.prod(s.shape) for g in packed.values() for s in g.values())
    assert parameter_counts(c) == parameter_counts(c.replace(quant=QuantConfig()))
    assert parameter_counts(c).total == logical_weights(packed) != elements


# ----------------------------------------------------------------------------- weights' bytes as stored

def file_bytes(folder) -> int:
    """Every tensor's bytes in the checkpoint's safetensors files, from their headers."""
    return sum(info["data_offsets"][1] - info["data_offsets"][0] for path in safetensors_files(folder)
               for name, info in check_safetensors(path)[0].items() if name != "__metadata__")


def float_checkpoint(folder, dtype=torch.float32):
    return save(build("mixtral", num_local_experts=4, intermediate_size=64).to(dtype), folder)


def block_fp8(folder, block, family, **overrides):
    """test_fp8's block-FP8 checkpoint: every Linear but the routers, the LM head and one o_proj
    (listed in modules_to_not_convert) float8_e4m3fn with float32 block scales."""
    fp8_checkpoint(build(family, **overrides), folder, block)
    return folder


FORMATS = {
    "float32": lambda d: float_checkpoint(d),
    "bfloat16": lambda d: float_checkpoint(d, torch.bfloat16),
    "fp8-mla-ragged": lambda d: block_fp8(d, (8, 8), "deepseek_v3", **DEEPSEEK),  # kv_a_proj: 24 rows
    "fp8-shared-expert": lambda d: block_fp8(d, (16, 16), "qwen2_moe", num_experts=4, moe_intermediate_size=16,
                                             shared_expert_intermediate_size=32),
    "mxfp4": lambda d: save_mxfp4(build("gpt_oss", **GPT_OSS_MXFP4), d),
    "int4": lambda d: quantize_checkpoint(float_checkpoint(d / "float"), d / "int4", bits=4),
    "int8": lambda d: quantize_checkpoint(float_checkpoint(d / "float"), d / "int8", bits=8),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_stored_bytes_are_the_files_bytes(fmt, tmp_path):
    folder = FORMATS[fmt](tmp_path)
    weights = stored_weights(load_config(folder), read_config_json(folder))
    assert weights.total == file_bytes(folder)
    kinds = {"float32": {"float32"}, "bfloat16": {"bfloat16"}, "mxfp4": {"MXFP4 blocks", "E8M0 scales", "float32"},
             "int4": {"int4 weights", "float32 scales", "float32"},
             "int8": {"int8 weights", "float32 scales", "float32"}}
    expected = kinds.get(fmt, {"float8_e4m3fn", "float32 block scales", "float32"})
    assert {name for name, n in weights.parts.items() if n} == expected


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fmt", [ct.PACKED, ct.NAIVE])
@pytest.mark.parametrize("group, symmetric", [(32, True), (16, False), (None, False)])
def test_compressed_tensors_bytes_are_what_encode_writes(bits, fmt, group, symmetric):
    """Every layout compressed-tensors defines, against the tensors `encode` writes for one Linear
    [out 24, in 64] (moecli's [in, out]): packed words, scales, zero points (packed down the outputs)."""
    scheme = ct.Scheme(bits=bits, group_size=group, symmetric=symmetric, format=fmt, scale_dtype="bfloat16")
    w = np.random.default_rng(0).normal(size=(24, 64)).astype(np.float32)
    tensors = ct.encode(*ct.quantize(w, bits, group, symmetric), scheme)
    assert sum(_compressed((2, 64, 24), scheme, 2, "bfloat16").values()) == 2 * sum(t.nbytes for t in tensors.values())


@pytest.mark.parametrize("case, gib", [("gpt-oss-20b", 12.8), ("gpt-oss-120b", 60.8)])
def test_gpt_oss_mxfp4_checkpoints_are_their_model_cards_size(case, gib):
    """OpenAI's model card: gpt-oss-20b's checkpoint is 12.8 GiB, gpt-oss-120b's 60.8 GiB."""
    hf = {**hf_config(case).to_dict(), "dtype": "bfloat16", "quantization_config": {"quant_method": "mxfp4"}}
    assert round(stored_weights(config_from_hf(hf), hf).total / 2**30, 1) == gib


# ----------------------------------------------------------------------------- the KV cache

@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kv_cache_bytes_per_layer_kind(dtype):
    size = jnp.dtype(dtype).itemsize
    deepseek = config_from_hf(T.DeepseekV3Config().to_dict())
    assert kv_cache_bytes(deepseek, dtype) == [CacheLayers("LatentCache", 61, (512 + 64) * size, None)]
    mixtral = config_from_hf(T.MixtralConfig().to_dict())           # 8 kv heads of 128, every layer
    assert kv_cache_bytes(mixtral, dtype) == [CacheLayers("KVCache", 32, 2 * 8 * 128 * size, None)]
    gpt_oss = config_from_hf(hf_config("gpt-oss-20b").to_dict())    # 8 kv heads of 64, every other layer windowed
    groups = kv_cache_bytes(gpt_oss, dtype)
    assert sorted(groups, key=lambda g: g.window or 0) == [CacheLayers("KVCache", 12, 2 * 8 * 64 * size, None),
                                                           CacheLayers("KVCache", 12, 2 * 8 * 64 * size, 128)]
    assert cache_bytes_at(groups, 1000) == 12 * 2 * 8 * 64 * size * (1000 + 128)


def config_only(folder, hf: dict):
    """A checkpoint folder with a real model's config.json and one tiny tensor: enough for `moe info`."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf))
    save_file({"x": np.zeros(4, np.float32)}, str(folder / "model.safetensors"))
    return folder


def moe_info(folder, *args) -> str:
    from moecli.cli.main import app

    result = CliRunner().invoke(app, ["info", str(folder), *args], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    return result.stdout


def test_moe_info_prints_latent_attentions_cache(tmp_path):
    """DeepSeek-V3: one latent of 512 and one shared RoPE key of 64 a token and layer, 576 values."""
    out = moe_info(config_only(tmp_path / "v3", T.DeepseekV3Config().to_dict()), "--dtype", "bfloat16")
    assert "70,272 B per token at bfloat16: 61 layers x 1,152 B (LatentCache)" in out
    assert "671.0B total, 36.6B active per token (LM head included, embedding table not)" in out


def test_moe_info_prints_grouped_query_attentions_cache_and_the_stored_bytes(tmp_path):
    hf = {**hf_config("gpt-oss-20b").to_dict(), "dtype": "bfloat16", "quantization_config": {"quant_method": "mxfp4"}}
    out = moe_info(config_only(tmp_path / "gpt-oss-20b", hf), "--dtype", "float32")
    assert ("98,304 B per token at float32: 12 layers x 4,096 B (KVCache, a 128-token sliding window: capped at "
            "it); 12 layers x 4,096 B (KVCache)") in out                          # 2 x 8 kv heads x 64 x 4 B
    assert "20.9B total, 3.6B active per token" in out
    assert "12.8 GiB (bfloat16 3.4 GiB + MXFP4 blocks 8.9 GiB + E8M0 scales 569.5 MiB) as stored" in out
