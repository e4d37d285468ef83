"""ERNIE-4.5 MoE (Baidu, "ERNIE 4.5 Technical Report", 2025; e.g. ERNIE-4.5-21B-A3B, -300B-A47B). The
layers from `moe_layer_start_index` to `moe_layer_end_index`, every `moe_layer_interval`-th, are MoE,
the others dense. The router is softmax then top-k with a selection-only bias on the probabilities
(`moe_statics.e_score_correction_bias`, as DeepSeek-V3's on sigmoid scores), the chosen weights
renormalised by max(sum, `moe_norm_min`) (router `softmax_topk` with `selection_bias`, `norm_min`);
`moe_num_shared_experts` always-on experts run as one SwiGLU of that many x moe_intermediate_size,
without a gate. `use_bias` puts biases on every projection but the experts' and the router's, the LM head's included. RoPE
rotates dimension pairs (2i, 2i + 1) of each whole head (`rope_interleave`), theta 500000 by default."""
from __future__ import annotations

from moecli.model.config import ModelConfig
from moecli.checkpoints.families.common import (Fields, Parts, Target, TensorMap, TensorSpec, base_fields,
                                                expert_tensors, rope_from_hf, swiglu_tensors)


PARTS = Parts(attention="gqa", router="softmax_topk", norm="rms")  # gqa with rope_interleave, biases


def moe_layers(f: Fields, n_layers: int) -> tuple[bool, ...]:
    """Layer i is MoE when start <= i <= end (end -1: the last layer) and (i + 1) % interval == 0."""
    start, end = f.get("moe_layer_start_index", 1), f.get("moe_layer_end_index", -1)
    end = n_layers - 1 if end == -1 else end
    interval = f.get("moe_layer_interval", 1)
    return tuple((i + 1) % interval == 0 and start <= i <= end for i in range(n_layers))


def config_from_hf(hf: dict) -> ModelConfig:
    f = Fields(hf, "ernie4_5_moe")
    top_k = f.get("moe_k", 6)
    base = {**base_fields(Fields({**hf, "num_experts_per_tok": top_k}, "ernie4_5_moe")),
            "norm_eps": f.get("rms_norm_eps", 1e-5, float), "tie_embeddings": f.get("tie_word_embeddings", True, bool)}
    n_experts, d_expert = f.get("moe_num_experts", 64), f.get("moe_intermediate_size", 1536)
    moe = moe_layers(f, base["n_layers"]) if n_experts else (False,) * base["n_layers"]
    bias = f.get("use_bias", False, bool)
    return ModelConfig(
        **base, **PARTS.fields(), d_ff=f.get("intermediate_size", 12288), d_expert=d_expert, n_experts=n_experts,
        moe_layers=moe, d_shared_expert=f.get("moe_num_shared_experts", 2) * d_expert, shared_expert_gate=False,
        norm_topk_prob=True, norm_min=f.get("moe_norm_min", 1e-12, float), selection_bias=True,
        rope=rope_from_hf(f, 500000.0), rope_interleave=True, qkv_bias=bias, o_bias=bias, mlp_bias=bias,
        lm_head_bias=bias)


def moe_tensors(c: ModelConfig, layer: int, hf: str, module: str) -> TensorMap:
    # The selection bias is stored [1, n_experts]: under mlp.moe_statics (the Hub's files) or, as
    # transformers' own module tree names it, mlp.gate.moe_statics.
    bias = TensorSpec((1, c.n_experts), (Target(module, "score_bias", transpose=False, shape=(c.n_experts,)),))
    table = {**expert_tensors(c, f"{hf}.mlp", module, ("gate_proj", "up_proj", "down_proj")),
             f"{hf}.mlp.moe_statics.e_score_correction_bias": bias,
             f"{hf}.mlp.gate.moe_statics.e_score_correction_bias": bias}
    if c.d_shared_expert:
        table.update(swiglu_tensors(f"{hf}.mlp.shared_experts", f"{module}/shared_expert", c.d_model,
                                    c.d_shared_expert, c.mlp_bias))
    return table
