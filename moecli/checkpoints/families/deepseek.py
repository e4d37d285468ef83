"""The DeepSeek-V3 lineage: DeepSeek-V2 and V2-Lite (DeepSeek-AI 2024, "DeepSeek-V2"), DeepSeek-V3 and
R1 ("DeepSeek-V3 Technical Report", 2024), the models built on V3's architecture (Moonshot's Kimi-K2,
whose config.json says model_type `kimi_k2`, and Moonlight), and GLM-4.7-Flash (`glm4_moe_lite`).

All use multi-head latent attention (attention `mla`, `moecli.model.mla`): the cache keeps one
compressed latent and one RoPE key per token. Their MoE blocks are DeepSeekMoE's (Dai et al. 2024):
many small routed experts plus `n_shared_experts` always-on ones, run as one SwiGLU of
n_shared_experts x moe_intermediate_size without a gate; the first `first_k_dense_replace` layers
are dense (GLM-4.7-Flash: `mlp_layer_types`). Routers:
- V2: softmax, top-k `greedy` or `group_limited_greedy` (only the experts of each token's
  `topk_group` best of `n_group` groups, a group ranked by its best probability), the weights
  times `routed_scaling_factor` and never renormalised (transformers ignores V2's norm_topk_prob;
  every V2 checkpoint sets it false);
- V3, Kimi-K2, GLM-4.7-Flash: sigmoid with a selection-only bias (`e_score_correction_bias`),
  group-limited by the sum of each group's two best scores (`sigmoid_topk`).
V2's `moe_layer_freq` (a MoE layer every that many, as DeepSeek's own code reads it; 1 in every
released checkpoint) is honoured. The multi-token-prediction layers V3 and GLM-4.7-Flash store after
the last layer (`num_nextn_predict_layers`) are not loaded (`ignored_tensors`)."""
from __future__ import annotations

import math

from moecli.errors import ConfigError
from moecli.model.config import DAMAGED, MLAConfig, ModelConfig, RopeConfig
from moecli.checkpoints.families import glm4_moe
from moecli.checkpoints.families.common import (Fields, Parts, TensorMap, _linear, _norm, base_fields, mtp_layers,
                                                rope_from_hf, rotary_dim_from_hf)

PARTS = Parts(attention="mla", router="sigmoid_topk", norm="rms")     # V3, Kimi-K2, Moonlight, GLM-4.7-Flash
PARTS_V2 = Parts(attention="mla", router="softmax_topk", norm="rms")  # V2, V2-Lite

# transformers' defaults where a config.json leaves a field out: (V2, V3, GLM-4.7-Flash)
DEFAULTS = {"first_k_dense_replace": (0, 3, None), "n_shared_experts": (2, 1, 1), "q_lora_rank": (1536, 1536, 768),
            "routed_scaling_factor": (1.0, 2.5, 1.8), "n_group": (1, 8, 1), "topk_group": (1, 4, 1),
            "num_nextn_predict_layers": (0, 1, 1), "rms_norm_eps": (1e-6, 1e-6, 1e-5)}


def default(family: str, key: str):
    return DEFAULTS[key][0 if family == "deepseek_v2" else 2 if family == "glm4_moe_lite" else 1]


def softmax_mscale(f: Fields, rope: RopeConfig) -> float:
    """transformers' `yarn_apply_mscale`: under a scaled RoPE with `mscale_all_dim`, the softmax scale is
    times mscale(factor)^2, mscale(s) = 0.1 mscale_all_dim ln(s) + 1 (DeepSeek's YaRN keeps the
    attention's entropy as the context grows: the rotated part's own scale is `rope.attention_factor`)."""
    params = f.hf.get("rope_parameters") or f.hf.get("rope_scaling") or {}
    m_all = Fields(params, f.family).get("mscale_all_dim", 0.0, float)
    if rope.kind == "default" or not m_all or rope.factor <= 1:
        return 1.0
    return (0.1 * m_all * math.log(rope.factor) + 1.0) ** 2


def mla_from_hf(f: Fields, rope: RopeConfig) -> MLAConfig:
    family = f.family
    if rotary_dim_from_hf(f, f.need("qk_rope_head_dim")):
        raise ConfigError(f"{family} with partial_rotary_factor < 1 is not supported",
                          "latent attention rotates the whole qk_rope_head_dim part")
    q_lora = 0 if "q_lora_rank" in f.hf and f.hf["q_lora_rank"] is None else f.get(
        "q_lora_rank", default(family, "q_lora_rank"))
    return MLAConfig(kv_lora_rank=f.need("kv_lora_rank"), qk_nope_head_dim=f.need("qk_nope_head_dim"),
                     qk_rope_head_dim=f.need("qk_rope_head_dim"), v_head_dim=f.need("v_head_dim"),
                     q_lora_rank=q_lora, softmax_mscale=softmax_mscale(f, rope),
                     # V2 rotates pairs (2i, 2i + 1) as complex numbers, always
                     rope_interleave=family == "deepseek_v2" or f.get("rope_interleave", True, bool))


def moe_layers(f: Fields, n_layers: int, n_experts: int) -> tuple[bool, ...]:
    if f.family == "glm4_moe_lite":  # transformers' default: the first layer dense
        types = f.get("mlp_layer_types", ["dense"] + ["sparse"] * (n_layers - 1), list)
        if len(types) != n_layers or not set(types) <= {"dense", "sparse"}:
            raise ConfigError(f"mlp_layer_types must list 'dense' or 'sparse' for each of {n_layers} layers, got "
                              f"{str(types)[:60]}", DAMAGED)
        return tuple(t == "sparse" and n_experts > 0 for t in types)
    first = f.get("first_k_dense_replace", default(f.family, "first_k_dense_replace"))
    every = f.get("moe_layer_freq", 1)
    return tuple(n_experts > 0 and i >= first and i % every == 0 for i in range(n_layers))


def routing_fields(f: Fields) -> dict:
    family = f.family
    fields = dict(routed_scaling_factor=f.get("routed_scaling_factor", default(family, "routed_scaling_factor"), float))
    if family != "deepseek_v2":
        return dict(fields, **PARTS.fields(), norm_topk_prob=f.get("norm_topk_prob", True, bool),
                    n_group=f.get("n_group", default(family, "n_group")),
                    topk_group=f.get("topk_group", default(family, "topk_group")))
    method = f.get("topk_method", "greedy", str)
    if method not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"deepseek_v2 with topk_method {method!r} is not supported",
                          "supported: greedy, group_limited_greedy")
    groups = (f.need("n_group"), f.need("topk_group")) if method == "group_limited_greedy" else (1, 1)
    return dict(fields, **PARTS_V2.fields(), norm_topk_prob=False, n_group=groups[0], topk_group=groups[1])


def config_from_hf(hf: dict) -> ModelConfig:
    family = hf.get("model_type")
    f = Fields(hf, family)
    if f.get("mlp_bias", False, bool):
        raise ConfigError(f"{family} with mlp_bias is not supported", "moecli's MLPs have no biases")
    base = base_fields(f)
    rope = rope_from_hf(f, 1e4)
    mla = mla_from_hf(f, rope)
    n_experts, d_expert = f.need("n_routed_experts", alias="num_local_experts"), f.need("moe_intermediate_size")
    bias = f.get("attention_bias", False, bool)
    base.update(n_kv_heads=base["n_heads"],  # no key/value heads: every head reads the one latent
                head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim,
                norm_eps=f.get("rms_norm_eps", default(family, "rms_norm_eps"), float))
    return ModelConfig(
        **base, **routing_fields(f), mla=mla, rope=rope, d_ff=f.get("intermediate_size", 0), d_expert=d_expert,
        n_experts=n_experts, moe_layers=moe_layers(f, base["n_layers"], n_experts),
        d_shared_expert=f.get("n_shared_experts", default(family, "n_shared_experts")) * d_expert,
        shared_expert_gate=False, qkv_bias=bias, o_bias=bias)


def attention_tensors(c: ModelConfig, layer: int, hf: str, module: str) -> TensorMap:
    """Latent attention's tensors, as transformers names them (`moecli.model.mla` has the parameters);
    attention_bias puts biases on q_a_proj, kv_a_proj_with_mqa and o_proj."""
    m, d, h = c.mla, c.d_model, c.n_heads
    if m.q_lora_rank:
        table = {**_linear(f"{hf}.q_a_proj", f"{module}/q_a_proj", m.q_lora_rank, d, c.qkv_bias),
                 **_norm(f"{hf}.q_a_layernorm", f"{module}/q_a_norm", m.q_lora_rank),
                 **_linear(f"{hf}.q_b_proj", f"{module}/q_b_proj", h * c.head_dim, m.q_lora_rank, False)}
    else:
        table = _linear(f"{hf}.q_proj", f"{module}/q_proj", h * c.head_dim, d, False)
    up = h * (m.qk_nope_head_dim + m.v_head_dim)
    return {**table,
            **_linear(f"{hf}.kv_a_proj_with_mqa", f"{module}/kv_a_proj", m.kv_lora_rank + m.qk_rope_head_dim, d,
                      c.qkv_bias),
            **_norm(f"{hf}.kv_a_layernorm", f"{module}/kv_a_norm", m.kv_lora_rank),
            **_linear(f"{hf}.kv_b_proj", f"{module}/kv_b_proj", up, m.kv_lora_rank, False),
            **_linear(f"{hf}.o_proj", f"{module}/o_proj", d, h * m.v_head_dim, c.o_bias)}


def moe_tensors(c: ModelConfig, layer: int, hf: str, module: str) -> TensorMap:
    """DeepSeekMoE's block, the one GLM-4.5 adopted (`glm4_moe.moe_tensors`): routed experts, the router
    and its selection bias (V2's softmax router has none), the shared experts."""
    table = glm4_moe.moe_tensors(c, layer, hf, module)
    if c.router != "sigmoid_topk":
        del table[f"{hf}.mlp.gate.e_score_correction_bias"]
    return table


def ignored_tensors(hf: dict) -> tuple[str, ...]:
    """The multi-token-prediction layers after the last decoder layer (`common.mtp_layers`)."""
    family = hf.get("model_type")
    return mtp_layers(Fields(hf, family), "num_nextn_predict_layers", default(family, "num_nextn_predict_layers"))
