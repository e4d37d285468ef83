"""Qwen3-Next (`qwen3_next`, Qwen3-Next-80B-A3B) and Qwen3.5-MoE (`qwen3_5_moe`, `qwen3_5_moe_text`; Alibaba):
hybrid layers. Those `layer_types` marks `linear_attention` are Gated DeltaNet linear attention
(`moecli.model.deltanet`: a recurrent state instead of a KV cache), the others (every fourth by default)
grouped-query attention with a per-head sigmoid output gate (the second half of each head's q_proj
rows), per-head q/k RMSNorm and RoPE on the first `partial_rotary_factor` (0.25) of each head. Every
RMSNorm outside the DeltaNet's gated norm stores scale - 1 ("zero-centred", norm `rms_offset`). The MoE
block is Qwen2-MoE's: a softmax top-k router over many experts plus a shared expert behind a sigmoid
gate. The multi-token-prediction weights (`mtp.*`) are skipped. Qwen3.5's released checkpoints are
multimodal (`Qwen3_5MoeForConditionalGeneration`: the text model's config under `text_config`, its
weights under `model.language_model.*`); the text model is loaded and the vision tower (`model.visual.*`)
skipped. Qwen3.5 stores the DeltaNet's input projections apart (in_proj_qkv, _z, _b, _a) and its RoPE
as interleaved M-RoPE sections, which for text (equal positions on every axis) is plain RoPE.
"""
from __future__ import annotations

from moecli.errors import ConfigError
from moecli.model.config import DAMAGED, DeltaNetConfig, ModelConfig
from moecli.checkpoints.families import qwen_moe
from moecli.checkpoints.families.common import (Fields, Parts, Target, TensorMap, TensorSpec, base_fields, gqa_tensors,
                                                rope_from_hf, rotary_dim_from_hf)

PARTS = Parts(attention="gqa", router="softmax_topk", norm="rms_offset")  # + "deltanet" on the linear layers
KINDS = {"full_attention": "gqa", "linear_attention": "deltanet"}
MULTIMODAL_PREFIX = "model.language_model."  # Qwen3_5MoeForConditionalGeneration's text model


def text_config(hf: dict) -> dict:
    """The text model's config: `text_config` of a multimodal checkpoint (top-level fields it lacks kept)."""
    text = hf.get("text_config")
    return {**hf, **text, "model_type": hf.get("model_type")} if isinstance(text, dict) else hf


def config_from_hf(hf: dict) -> ModelConfig:
    family = hf.get("model_type")
    f = Fields(text_config(hf), family)
    base = base_fields(f)
    n_layers, n_experts = base["n_layers"], f.need("num_experts")
    types = f.get("layer_types", None, list)
    if types is None:
        interval = f.get("full_attention_interval", 4)
        types = ["full_attention" if (i + 1) % max(interval, 1) == 0 else "linear_attention" for i in range(n_layers)]
    if any(t not in KINDS for t in types):
        raise ConfigError(f"layer_types must be full_attention or linear_attention, got {sorted(set(types))}", DAMAGED)
    step, dense_only = f.get("decoder_sparse_step", 1), f.get("mlp_only_layers", [], list)
    bias = f.get("attention_bias", False, bool)
    deltanet = DeltaNetConfig(
        n_k_heads=f.get("linear_num_key_heads", 16), n_v_heads=f.get("linear_num_value_heads", 32),
        k_head_dim=f.get("linear_key_head_dim", 128), v_head_dim=f.get("linear_value_head_dim", 128),
        conv_kernel=f.get("linear_conv_kernel_dim", 4), layout="grouped" if family == "qwen3_next" else "split")
    return ModelConfig(
        **base, **PARTS.fields(), d_ff=f.get("intermediate_size", 0), d_expert=f.need("moe_intermediate_size"),
        n_experts=n_experts, moe_layers=tuple(i not in dense_only and n_experts > 0 and (i + 1) % step == 0
                                              for i in range(n_layers)),
        norm_topk_prob=f.get("norm_topk_prob", True, bool), d_shared_expert=f.get("shared_expert_intermediate_size", 0),
        rope=rope_from_hf(f, 1e4), rotary_dim=rotary_dim_from_hf(f, base["head_dim"], 0.25), qkv_bias=bias,
        o_bias=bias, qk_norm="head", attn_output_gate=True, deltanet=deltanet,
        layer_attention=tuple(KINDS[t] for t in types))


moe_tensors = qwen_moe.moe_tensors  # experts, router, shared expert and its gate: Qwen2-MoE's names


def _weight(name: str, module: str, param: str, shape: tuple[int, ...], transpose: bool = True) -> TensorMap:
    return {name: TensorSpec(shape, (Target(module, param, transpose=transpose),))}


def attention_tensors(c: ModelConfig, layer: int, hf: str, module: str) -> TensorMap:
    """Full-attention layers: GQA's names, q_proj twice as tall (query and gate); linear layers: `linear_attn.*`."""
    if c.attention_of(layer) == "gqa":
        table = gqa_tensors(c, layer, hf, module)
        table.update(_weight(f"{hf}.q_proj.weight", f"{module}/q_proj", "w", (2 * c.n_heads * c.head_dim, c.d_model)))
        if c.qkv_bias:
            table.update(_weight(f"{hf}.q_proj.bias", f"{module}/q_proj", "b", (2 * c.n_heads * c.head_dim,), False))
        return table
    d, hf = c.deltanet, hf.rpartition(".")[0] + ".linear_attn"
    key, value = d.n_k_heads * d.k_head_dim, d.n_v_heads * d.v_head_dim
    if d.layout == "grouped":
        projections = {"in_proj_qkvz": 2 * key + 2 * value, "in_proj_ba": 2 * d.n_v_heads}
    else:
        projections = {"in_proj_qkv": 2 * key + value, "in_proj_z": value, "in_proj_b": d.n_v_heads,
                       "in_proj_a": d.n_v_heads}
    projections["out_proj"] = c.d_model
    table: TensorMap = {}
    for name, rows in projections.items():
        table.update(_weight(f"{hf}.{name}.weight", f"{module}/{name}", "w",
                             (rows, value if name == "out_proj" else c.d_model)))
    table.update(_weight(f"{hf}.conv1d.weight", module, "conv_w", (2 * key + value, 1, d.conv_kernel), False))
    table.update(_weight(f"{hf}.A_log", module, "A_log", (d.n_v_heads,), False))
    table.update(_weight(f"{hf}.dt_bias", module, "dt_bias", (d.n_v_heads,), False))
    table.update(_weight(f"{hf}.norm.weight", f"{module}/norm", "scale", (d.v_head_dim,), False))
    return table


def ignored_tensors(hf: dict) -> tuple[str, ...]:
    return ("mtp.", "model.visual.") if hf.get("model_type") == "qwen3_5_moe" else ("mtp.",)


def tensor_names(c: ModelConfig, table: TensorMap) -> TensorMap:
    """The multimodal `qwen3_5_moe` keeps the text model under `model.language_model.` (the LM head stays)."""
    if c.family != "qwen3_5_moe":
        return table
    return {MULTIMODAL_PREFIX + name[len("model."):] if name.startswith("model.") else name: spec
            for name, spec in table.items()}


IGNORED_REASON = ("as the multi-token-prediction layers (mtp.*: moecli does no speculative decoding) and Qwen3.5's "
                  "vision tower (model.visual.*: moecli runs the text model alone)")
