"""Qwen1.5/Qwen2-MoE and Qwen3-MoE (Alibaba). Both allow dense layers among the MoE ones: a layer is
MoE unless listed in `mlp_only_layers`, and only every `decoder_sparse_step`-th layer is.
Qwen2-MoE adds biases to q/k/v and an always-on shared expert scaled by a sigmoid gate
(DeepSeekMoE's "shared expert isolation", Dai et al. 2024); Qwen3-MoE drops both and normalises
each query/key head with RMSNorm ("QK-norm", for training stability)."""
from __future__ import annotations

from moecli.model.config import ModelConfig
from moecli.checkpoints.families.common import (Fields, Parts, Target, TensorMap, TensorSpec, base_fields, expert_tensors,
                                    rope_from_hf, swiglu_tensors)


PARTS = Parts(attention="gqa", router="softmax_topk", norm="rms")  # Qwen3: q/k norm per head

def config_from_hf(hf: dict) -> ModelConfig:
    family = hf.get("model_type")
    f = Fields(hf, family)
    base = base_fields(f)
    n_layers, n_experts = base["n_layers"], f.need("num_experts", alias="num_local_experts")
    step, dense_only = f.get("decoder_sparse_step", 1), f.get("mlp_only_layers", [], list)
    moe = tuple(i not in dense_only and n_experts > 0 and (i + 1) % step == 0 for i in range(n_layers))
    qwen2 = family == "qwen2_moe"
    bias = f.get("qkv_bias", True, bool) if qwen2 else f.get("attention_bias", False, bool)
    window, sliding = None, ()
    if f.get("use_sliding_window", False, bool):
        window = f.get("sliding_window", None)
        types = f.get("layer_types", None, list)
        if types is not None:
            sliding = tuple(t == "sliding_attention" for t in types)
        elif qwen2:
            sliding = tuple(i >= f.get("max_window_layers", n_layers) for i in range(n_layers))
    return ModelConfig(
        **base, **PARTS.fields(), d_ff=f.get("intermediate_size", 0), d_expert=f.need("moe_intermediate_size"),
        n_experts=n_experts, moe_layers=moe, norm_topk_prob=f.get("norm_topk_prob", not qwen2, bool),
        d_shared_expert=f.get("shared_expert_intermediate_size", 0) if qwen2 else 0,
        rope=rope_from_hf(f, 1e6 if not qwen2 else 1e4), qkv_bias=bias, o_bias=bias and not qwen2,
        qk_norm="none" if qwen2 else "head", sliding_window=window, sliding_layers=sliding)


def moe_tensors(c: ModelConfig, layer: int, hf: str, module: str) -> TensorMap:
    table = expert_tensors(c, f"{hf}.mlp", module, ("gate_proj", "up_proj", "down_proj"))
    if c.d_shared_expert:
        table.update(swiglu_tensors(f"{hf}.mlp.shared_expert", f"{module}/shared_expert",
                                    c.d_model, c.d_shared_expert))
        table[f"{hf}.mlp.shared_expert_gate.weight"] = TensorSpec(
            (1, c.d_model), (Target(f"{module}/shared_expert_gate", "w"),))
    return table
