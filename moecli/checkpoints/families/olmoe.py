"""OLMoE (Allen AI, Muennighoff et al. 2024): 64 small experts, top-8, no shared expert. Its
attention normalises the whole query and key projections with RMSNorm before splitting heads,
and can clip q, k and v to [-clip_qkv, clip_qkv]."""
from __future__ import annotations

from moecli.model.config import ModelConfig
from moecli.checkpoints.families.common import Fields, Parts, TensorMap, base_fields, expert_tensors, rope_from_hf


PARTS = Parts(attention="gqa", router="softmax_topk", norm="rms")  # q/k norm "full", clip_qkv: options of gqa

def config_from_hf(hf: dict) -> ModelConfig:
    f = Fields(hf, "olmoe")
    base = base_fields(f)
    bias = f.get("attention_bias", False, bool)
    return ModelConfig(
        **base, **PARTS.fields(), d_ff=0, d_expert=f.need("intermediate_size"), n_experts=f.need("num_experts", alias="num_local_experts"),
        moe_layers=(True,) * base["n_layers"], norm_topk_prob=f.get("norm_topk_prob", False, bool),
        rope=rope_from_hf(f, 1e4), qkv_bias=bias, o_bias=bias, qk_norm="full",
        clip_qkv=f.get("clip_qkv", None, float))


def moe_tensors(c: ModelConfig, layer: int, hf: str, module: str) -> TensorMap:
    return expert_tensors(c, f"{hf}.mlp", module, ("gate_proj", "up_proj", "down_proj"))
