"""Hunyuan-A13B (Tencent, `hunyuan_v1_moe`: Hunyuan-A13B-Instruct, 80 B total, 13 B active). Every layer is
MoE: a softmax router (`mlp.gate.wg`) chooses `moe_topk` of `num_experts` experts, their weights renormalised
(router `softmax_topk`), plus an always-on SwiGLU `shared_mlp` without a gate; the experts and the shared MLP
are all `intermediate_size` wide. Attention normalises each query and key head with a weighted RMSNorm
(`query_layernorm`, `key_layernorm`) *after* RoPE (q/k norm "head_after_rope": a rotation keeps each head's
RMS, but not where its per-dimension weights land, so the order matters), with q/k/v/o biases when
`attention_bias`. RoPE is NTK-aware with a fixed `alpha` (the checkpoints label it "dynamic"): only the base
grows, to rope_theta * alpha^(head_dim / (head_dim - 2)) (bloc97, "NTK-Aware Scaled RoPE", 2023), the same at
every length, so it is plain RoPE with that base. `num_experts` and `moe_topk` may be per-layer lists (the
released config.json repeats one value); transformers builds every layer from one value, and so does moecli."""
from __future__ import annotations

from moecli.errors import ConfigError
from moecli.model.config import DAMAGED, ModelConfig, RopeConfig
from moecli.checkpoints.families.common import (Fields, Parts, Target, TensorMap, TensorSpec, base_fields,
                                                expert_tensors, gqa_tensors, rope_from_hf, swiglu_tensors)


PARTS = Parts(attention="gqa", router="softmax_topk", norm="rms")  # q/k norm "head_after_rope": a gqa option


def one_value(f: Fields, key: str, default: int) -> int:
    """An int field that may be stored as a per-layer list of one repeated value."""
    value = f.hf.get(key)
    if isinstance(value, list):
        if not value or len(set(map(repr, value))) != 1:
            raise ConfigError(f"config.json field {key!r} differs between layers ({str(value)[:60]})",
                              "moecli (as transformers) builds every layer with one value")
        return Fields({key: value[0]}, f.family).get(key, default)
    return f.get(key, default)


def rope_from_alpha(f: Fields, head_dim: int) -> RopeConfig:
    """RoPE of rope_parameters (or the legacy rope_scaling): type "dynamic" with an `alpha` is NTK-alpha,
    a larger base; "dynamic" without one (NTK rescaled by the sequence length) is not supported."""
    params = f.hf.get("rope_parameters") or f.hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type")) if isinstance(params, dict) else None
    if kind != "dynamic":
        return rope_from_hf(f, 1e4)
    p = Fields(params, f.family)
    alpha, theta = p.get("alpha", None, float), p.get("rope_theta", f.get("rope_theta", 1e4, float), float)
    if alpha is None:
        raise ConfigError("dynamic NTK RoPE without a fixed alpha is not supported",
                          "moecli supports Hunyuan's NTK-alpha RoPE (rope_parameters with an alpha)")
    if alpha <= 0 or head_dim <= 2:
        raise ConfigError(f"NTK-alpha RoPE needs alpha > 0 and head_dim > 2, got {alpha} and {head_dim}", DAMAGED)
    return RopeConfig(theta=theta * alpha ** (head_dim / (head_dim - 2)))


def config_from_hf(hf: dict) -> ModelConfig:
    f = Fields(hf, "hunyuan_v1_moe")
    top_k = one_value(f, "moe_topk", 1)
    base = {**base_fields(Fields({**hf, "num_experts_per_tok": top_k}, "hunyuan_v1_moe")),
            "norm_eps": f.get("rms_norm_eps", 1e-5, float)}
    d_expert, bias = f.need("intermediate_size"), f.get("attention_bias", False, bool)
    return ModelConfig(
        **base, **PARTS.fields(), d_ff=0, d_expert=d_expert, n_experts=one_value(f, "num_experts", 1),
        moe_layers=(True,) * base["n_layers"], norm_topk_prob=True, d_shared_expert=d_expert,
        shared_expert_gate=False, rope=rope_from_alpha(f, base["head_dim"]), qkv_bias=bias, o_bias=bias,
        qk_norm="head_after_rope")


def attention_tensors(c: ModelConfig, layer: int, hf: str, module: str) -> TensorMap:
    table = gqa_tensors(c, layer, hf, module)  # q/k/v/o (+ biases); the norms under Hunyuan's names:
    for name, norm in (("query_layernorm", "q_norm"), ("key_layernorm", "k_norm")):
        table[f"{hf}.{name}.weight"] = TensorSpec((c.head_dim,), (Target(f"{module}/{norm}", "scale", transpose=False),))
    return table


def moe_tensors(c: ModelConfig, layer: int, hf: str, module: str) -> TensorMap:
    # Hub files and save_pretrained: mlp.experts.{e}.{gate,up,down}_proj; transformers 5's own state dict:
    # mlp.experts.gate_up_proj / down_proj; the router is mlp.gate.wg either way
    table = expert_tensors(c, f"{hf}.mlp", module, ("gate_proj", "up_proj", "down_proj"))
    table[f"{hf}.mlp.gate.wg.weight"] = table.pop(f"{hf}.mlp.gate.weight")
    table.update(swiglu_tensors(f"{hf}.mlp.shared_mlp", f"{module}/shared_expert", c.d_model, c.d_shared_expert))
    return table
