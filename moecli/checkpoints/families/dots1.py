"""dots.llm1 (rednote-hilab, "dots.llm1 Technical Report", 2025; dots.llm1.base / .inst, 142 B total, 14 B
active): DeepSeek-V3's MoE block on Qwen3's attention. The router scores experts with a sigmoid and chooses
them with a selection-only bias (`e_score_correction_bias`), within the best `topk_group` of `n_group`
groups, the chosen scores renormalised when `norm_topk_prob` and times `routed_scaling_factor` (router
`sigmoid_topk`, as GLM-4.5's, whose tensor names it shares: `glm4_moe.moe_tensors`); `n_shared_experts`
always-on experts run as one SwiGLU of n_shared_experts x moe_intermediate_size without a gate; the first
`first_k_dense_replace` layers are dense. Attention is Qwen3's: per-head q/k RMSNorm before RoPE, biases on
q/k/v and o when `attention_bias`, and a sliding window on the layers `layer_types` marks."""
from __future__ import annotations

from moecli.model.config import ModelConfig
from moecli.checkpoints.families.common import Fields, Parts, base_fields, rope_from_hf
from moecli.checkpoints.families.glm4_moe import moe_tensors  # noqa: F401  (the same block, the same names)


PARTS = Parts(attention="gqa", router="sigmoid_topk", norm="rms")  # per-head q/k norm, windows: gqa options


def sliding_layers(f: Fields, n_layers: int) -> tuple[bool, ...]:
    """Per layer: the window applies. `layer_types` when config.json has it, else transformers' rule: the
    layers from `max_window_layers` on, when there is a `sliding_window`."""
    types = f.get("layer_types", None, list)
    if types is not None:
        return tuple(t == "sliding_attention" for t in types)
    first = f.get("max_window_layers", n_layers)
    return tuple(i >= first for i in range(n_layers))


def config_from_hf(hf: dict) -> ModelConfig:
    f = Fields(hf, "dots1")
    base = base_fields(f)
    n_layers, d_expert = base["n_layers"], f.need("moe_intermediate_size")
    first_dense, window = f.get("first_k_dense_replace", 0), f.get("sliding_window", None)
    bias = f.get("attention_bias", False, bool)
    return ModelConfig(
        **base, **PARTS.fields(), d_ff=f.get("intermediate_size", 0), d_expert=d_expert,
        n_experts=f.need("n_routed_experts", alias="num_local_experts"),
        moe_layers=tuple(i >= first_dense for i in range(n_layers)),
        d_shared_expert=f.get("n_shared_experts", 0) * d_expert, shared_expert_gate=False,
        n_group=f.get("n_group", 1), topk_group=f.get("topk_group", 1),
        routed_scaling_factor=f.get("routed_scaling_factor", 1.0, float),
        norm_topk_prob=f.get("norm_topk_prob", False, bool), rope=rope_from_hf(f, 1e4),
        qkv_bias=bias, o_bias=bias, qk_norm="head", sliding_window=window,
        sliding_layers=sliding_layers(f, n_layers) if window is not None else ())
