"""MiniMax-M2 (MiniMax, 2025): 256 experts, top-8, every layer MoE, no shared expert. The router
scores experts with a sigmoid and chooses them with a selection-only bias (`e_score_correction_bias`),
the chosen scores always renormalised, no groups, no scaling (router `sigmoid_topk`). Attention
RMSNorms the whole query and key projections before splitting heads (q/k norm "full", as OLMoE) and
rotates only the first `rotary_dim` dimensions of each head. Hub checkpoints name the block
`block_sparse_moe` and the expert projections w1 (gate), w3 (up), w2 (down); multi-token-prediction
modules (`num_mtp_modules`, when `use_mtp`) stored after the last layer are skipped."""
from __future__ import annotations

from moecli.model.config import ModelConfig
from moecli.checkpoints.families.common import (Fields, Parts, TensorMap, base_fields, expert_tensors, mtp_layers,
                                                rope_from_hf, rotary_dim_from_hf, score_bias_tensor)


PARTS = Parts(attention="gqa", router="sigmoid_topk", norm="rms")  # q/k norm "full", partial rotary: gqa options

def config_from_hf(hf: dict) -> ModelConfig:
    f = Fields(hf, "minimax_m2")
    base = {**base_fields(f), "head_dim": f.get("head_dim", 0) or 128}  # transformers' default head_dim
    rotary = f.get("rotary_dim", 0)  # the released configs' legacy field; partial_rotary_factor wins
    return ModelConfig(
        **base, **PARTS.fields(), d_ff=0, d_expert=f.need("intermediate_size"),
        n_experts=f.need("num_local_experts", alias="num_experts"), moe_layers=(True,) * base["n_layers"],
        norm_topk_prob=True, rope=rope_from_hf(f, 5e6),
        rotary_dim=rotary_dim_from_hf(f, base["head_dim"], rotary / base["head_dim"] if rotary else 1.0),
        qk_norm="full")


def moe_tensors(c: ModelConfig, layer: int, hf: str, module: str) -> TensorMap:
    # Hub files: block_sparse_moe.{gate, e_score_correction_bias, experts.{e}.w1/w3/w2};
    # transformers 5's own state dict: mlp.{gate, e_score_correction_bias, experts.gate_up_proj/down_proj}
    return {**expert_tensors(c, f"{hf}.block_sparse_moe", module, ("w1", "w3", "w2")),
            **expert_tensors(c, f"{hf}.mlp", module, ("gate_proj", "up_proj", "down_proj")),
            **score_bias_tensor(f"{hf}.block_sparse_moe.e_score_correction_bias", module, c.n_experts),
            **score_bias_tensor(f"{hf}.mlp.e_score_correction_bias", module, c.n_experts)}


def ignored_tensors(hf: dict) -> tuple[str, ...]:
    f = Fields(hf, "minimax_m2")
    return mtp_layers(f, "num_mtp_modules", 0) if f.get("use_mtp", False, bool) else ()
