"""gpt-oss (OpenAI, 2025; gpt-oss-20b: 24 layers, 32 experts; gpt-oss-120b: 36 layers, 128 experts;
top-4 of them). Grouped-query attention with biases on q/k/v/o and a learned sink logit per head
(`attention_sinks`), layers alternating a 128-token sliding window and full attention (`layer_types`),
YaRN RoPE (32x over a 4096-token original context, untruncated ramp); a router with a bias that picks
the top-k logits and softmaxes over them alone (`topk_softmax`); experts with biases and a clamped
SwiGLU (`clamped_swiglu`). transformers stores each layer's experts fused, already [in, out]:
gate_up_proj [e, d, 2f] with gate and up *interleaved* (even columns gate, odd up), down_proj [e, f, d].
The table names the float tensors `save_pretrained` writes; the Hub's MXFP4 checkpoints store each expert
stack as `{name}_blocks` / `{name}_scales`, which `moecli.checkpoints.mxfp4` pairs back into `{name}`
(kept packed: `moecli.model.mxfp4`), so the same entries serve both.
"""
from __future__ import annotations

from moecli.model.config import DAMAGED, ModelConfig
from moecli.errors import ConfigError
from moecli.checkpoints.families.common import Fields, Parts, Target, TensorMap, TensorSpec, base_fields, rope_from_hf

PARTS = Parts(attention="gqa", router="topk_softmax", norm="rms")  # sinks, biases: options of gqa

#: transformers' GptOssConfig defaults where they differ from what `base_fields` assumes for a missing field.
DEFAULTS = dict(head_dim=64, num_key_value_heads=8, rms_norm_eps=1e-5, sliding_window=128, num_experts_per_tok=4)
#: GptOssConfig's rope_parameters when config.json has none.
DEFAULT_ROPE = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                    original_max_position_embeddings=4096)
LAYER_TYPES = ("sliding_attention", "full_attention")


def config_from_hf(hf: dict) -> ModelConfig:
    hf = {**DEFAULTS, **hf}  # a key present with null keeps null: transformers then derives it as base_fields does
    if not (hf.get("rope_parameters") or hf.get("rope_scaling")):
        hf["rope_parameters"] = DEFAULT_ROPE
    f = Fields(hf, "gpt_oss")
    base = base_fields(f)
    n_layers = base["n_layers"]
    types = f.get("layer_types", None, list)
    if types is None:  # transformers' default: sliding first, then alternating
        types = [LAYER_TYPES[i % 2] for i in range(n_layers)]
    if any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"config.json field 'layer_types' may hold only {' and '.join(LAYER_TYPES)}", DAMAGED)
    bias = f.get("attention_bias", True, bool)
    return ModelConfig(
        **base, **PARTS.fields(), d_ff=0, d_expert=f.need("intermediate_size"),
        n_experts=f.need("num_local_experts", alias="num_experts"), moe_layers=(True,) * n_layers,
        norm_topk_prob=True, rope=rope_from_hf(f, 150000.0), qkv_bias=bias, o_bias=bias, attention_sinks=True,
        sliding_window=f.get("sliding_window", None), sliding_layers=tuple(t == LAYER_TYPES[0] for t in types),
        expert_act="clamped_swiglu", expert_bias=True, swiglu_limit=f.get("swiglu_limit", 7.0, float),
        swiglu_alpha=f.get("swiglu_alpha", 1.702, float))


def moe_tensors(c: ModelConfig, layer: int, hf: str, module: str) -> TensorMap:
    d, f, n = c.d_model, c.d_expert, c.n_experts
    experts = f"{hf}.mlp.experts"

    def interleaved(shape: tuple[int, ...], gate: str, up: str) -> TensorSpec:
        """Gate and up interleaved along the last (out) axis: even entries gate, odd up."""
        return TensorSpec(shape, (Target(module, gate, transpose=False, rows=(0, 2 * f), stride=2),
                                  Target(module, up, transpose=False, rows=(1, 2 * f), stride=2)))

    return {
        f"{hf}.mlp.router.weight": TensorSpec((n, d), (Target(module, "router"),)),
        f"{hf}.mlp.router.bias": TensorSpec((n,), (Target(module, "router_bias", transpose=False),)),
        f"{experts}.gate_up_proj": interleaved((n, d, 2 * f), "w_gate", "w_up"),
        f"{experts}.gate_up_proj_bias": interleaved((n, 2 * f), "b_gate", "b_up"),
        f"{experts}.down_proj": TensorSpec((n, f, d), (Target(module, "w_down", transpose=False),)),
        f"{experts}.down_proj_bias": TensorSpec((n, d), (Target(module, "b_down", transpose=False),)),
    }
