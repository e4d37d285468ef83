"""Mixtral (Mistral AI, "Mixtral of Experts", 2024): 8 experts, top-2, gate weights always
renormalised, no shared expert, every layer MoE. Hub checkpoints name the block
`block_sparse_moe` and the expert projections w1 (gate), w3 (up), w2 (down)."""
from __future__ import annotations

from moecli.model.config import ModelConfig
from moecli.checkpoints.families.common import Fields, Parts, TensorMap, base_fields, expert_tensors, rope_from_hf


PARTS = Parts(attention="gqa", router="softmax_topk", norm="rms")

def config_from_hf(hf: dict) -> ModelConfig:
    f = Fields(hf, "mixtral")
    base = base_fields(f)
    return ModelConfig(
        **base, **PARTS.fields(), d_ff=0, d_expert=f.need("intermediate_size"), n_experts=f.need("num_local_experts", alias="num_experts"),
        moe_layers=(True,) * base["n_layers"], norm_topk_prob=True,
        rope=rope_from_hf(f, 1e6), sliding_window=f.get("sliding_window", None))


def moe_tensors(c: ModelConfig, layer: int, hf: str, module: str) -> TensorMap:
    # Hub files say block_sparse_moe.experts.{e}.w1; transformers 5's own state dict says mlp.experts.*
    return {**expert_tensors(c, f"{hf}.block_sparse_moe", module, ("w1", "w3", "w2")),
            **expert_tensors(c, f"{hf}.mlp", module, ("gate_proj", "up_proj", "down_proj"))}
