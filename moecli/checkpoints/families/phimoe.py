"""Phi-3.5-MoE (Microsoft, "Phi-3 Technical Report", 2024; microsoft/Phi-3.5-MoE-instruct): 16 experts
of Mixtral's shape, every layer MoE, routed by SparseMixer-v2 (router `sparsemixer`: always top-2, each
weight a softmax over the experts near the chosen one, `router_jitter_noise` setting "near"). LayerNorm
with biases instead of RMSNorm, optional biases on q/k/v/o (`attention_bias`) and on the LM head
(`lm_head_bias`), a sliding window when configured, and LongRoPE for its 128k context: each frequency
divided by its own factor and cos/sin scaled by an mscale. transformers 5.24 (the oracle) applies the
`short_factor` at every length and switches only the mscale beyond `original_max_position_embeddings`;
moecli does the same with the factors, and refuses a config whose two mscales differ, which that
switch would matter for."""
from __future__ import annotations

from moecli.model.config import DAMAGED, ModelConfig, RopeConfig
from moecli.errors import ConfigError
from moecli.checkpoints.families.common import (Fields, Parts, TensorMap, base_fields, expert_tensors,
                                                rope_from_hf)


PARTS = Parts(attention="gqa", router="sparsemixer", norm="layer")


def longrope(f: Fields, head_dim: int) -> RopeConfig:
    """LongRoPE from rope_parameters / rope_scaling {"rope_type" or "type": "longrope", short_factor,
    long_factor, short_mscale, long_mscale}; other rope types as every family reads them."""
    params = f.hf.get("rope_parameters") or f.hf.get("rope_scaling") or {}
    p = Fields(params if isinstance(params, dict) else {}, f.family)
    if p.get("rope_type", p.get("type", "default", str), str) != "longrope":
        return rope_from_hf(f, 1e4)
    short, mscale = p.need("short_factor", list), p.need("short_mscale", float)
    if p.need("long_mscale", float) != mscale:
        raise ConfigError(f"LongRoPE with different short and long mscales ({mscale}, {p.need('long_mscale', float)}) "
                          "is not supported", "transformers switches between them by the sequence's length")
    if len(short) != head_dim // 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in short):
        raise ConfigError(f"LongRoPE's short_factor must be {head_dim // 2} numbers (one per frequency), got "
                          f"{len(short)} entries", DAMAGED)
    theta = p.get("rope_theta", f.get("rope_theta", 1e4, float), float)
    return RopeConfig(theta=theta, kind="longrope", factors=tuple(float(x) for x in short), attention_factor=mscale)


def config_from_hf(hf: dict) -> ModelConfig:
    f = Fields(hf, "phimoe")
    base = {**base_fields(f), "norm_eps": f.get("rms_norm_eps", 1e-5, float)}
    bias = f.get("attention_bias", False, bool)
    return ModelConfig(
        **base, **PARTS.fields(), d_ff=0, d_expert=f.need("intermediate_size"),
        n_experts=f.need("num_local_experts"), moe_layers=(True,) * base["n_layers"],
        sparsemixer_eps=f.get("router_jitter_noise", 0.01, float), rope=longrope(f, base["head_dim"]),
        qkv_bias=bias, o_bias=bias, lm_head_bias=f.get("lm_head_bias", False, bool),
        sliding_window=f.get("sliding_window", None))


def moe_tensors(c: ModelConfig, layer: int, hf: str, module: str) -> TensorMap:
    # transformers 5 names the router mlp.router; the Hub's files block_sparse_moe.gate and experts w1/w3/w2
    table = {**expert_tensors(c, f"{hf}.block_sparse_moe", module, ("w1", "w3", "w2")),
             **expert_tensors(c, f"{hf}.mlp", module, ("gate_proj", "up_proj", "down_proj"))}
    table[f"{hf}.mlp.router.weight"] = table.pop(f"{hf}.mlp.gate.weight")
    return table
