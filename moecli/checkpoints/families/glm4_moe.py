"""GLM-4.5, GLM-4.6 and GLM-4.5-Air (Zhipu AI, "GLM-4.5: Agentic, Reasoning, and Coding (ARC)
Foundation Models", 2025): DeepSeek-V3's MoE recipe on grouped-query attention. The router scores
experts with a sigmoid and chooses them with a selection-only bias, within the best `topk_group` of
`n_group` expert groups, the weights times `routed_scaling_factor` (router `sigmoid_topk`);
`n_shared_experts` always-on experts run as one SwiGLU of n_shared_experts x moe_intermediate_size,
without a gate; the first `first_k_dense_replace` layers are dense. Attention has q/k/v biases, an
optional per-head q/k RMSNorm (`use_qk_norm`) and RoPE on the first `partial_rotary_factor` of each
head only. The multi-token-prediction layers stored after the last one (`num_nextn_predict_layers`)
are skipped."""
from __future__ import annotations

from moecli.model.config import ModelConfig
from moecli.checkpoints.families.common import (Fields, Parts, TensorMap, base_fields, expert_tensors, mtp_layers,
                                                rope_from_hf, rotary_dim_from_hf, score_bias_tensor, swiglu_tensors)


PARTS = Parts(attention="gqa", router="sigmoid_topk", norm="rms")  # q/k norm per head, partial rotary: gqa options

def config_from_hf(hf: dict) -> ModelConfig:
    f = Fields(hf, "glm4_moe")
    base = {**base_fields(f), "norm_eps": f.get("rms_norm_eps", 1e-5, float)}
    first_dense, d_expert = f.get("first_k_dense_replace", 1), f.need("moe_intermediate_size")
    return ModelConfig(
        **base, **PARTS.fields(), d_ff=f.get("intermediate_size", 0), d_expert=d_expert,
        n_experts=f.need("n_routed_experts", alias="num_local_experts"),
        moe_layers=tuple(i >= first_dense for i in range(base["n_layers"])),
        d_shared_expert=f.get("n_shared_experts", 1) * d_expert, shared_expert_gate=False,
        n_group=f.get("n_group", 1), topk_group=f.get("topk_group", 1),
        routed_scaling_factor=f.get("routed_scaling_factor", 1.0, float),
        norm_topk_prob=f.get("norm_topk_prob", True, bool), rope=rope_from_hf(f, 1e4),
        rotary_dim=rotary_dim_from_hf(f, base["head_dim"], 0.5), qkv_bias=f.get("attention_bias", False, bool),
        qk_norm="head" if f.get("use_qk_norm", False, bool) else "none")


def moe_tensors(c: ModelConfig, layer: int, hf: str, module: str) -> TensorMap:
    table = {**expert_tensors(c, f"{hf}.mlp", module, ("gate_proj", "up_proj", "down_proj")),
             **score_bias_tensor(f"{hf}.mlp.gate.e_score_correction_bias", module, c.n_experts)}
    if c.d_shared_expert:
        table.update(swiglu_tensors(f"{hf}.mlp.shared_experts", f"{module}/shared_expert", c.d_model,
                                    c.d_shared_expert))
    return table


def ignored_tensors(hf: dict) -> tuple[str, ...]:
    return mtp_layers(Fields(hf, "glm4_moe"), "num_nextn_predict_layers", 1)  # transformers' default: 1
