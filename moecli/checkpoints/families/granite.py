"""IBM Granite MoE (`granitemoe`: granite-3.0/3.1-1b-a400m and -3b-a800m, PowerMoE) and Granite MoE with a
shared expert (`granitemoeshared`). Mixtral's block (softmax over the top-k router logits, i.e. the
renormalised top-k of the softmax) on Llama attention, with four constant multipliers from muP-style
training (Yang et al. 2021, "Tensor Programs V"): the embeddings times `embedding_multiplier`, the
softmax scale `attention_multiplier` instead of 1/sqrt(head_dim), each residual branch times
`residual_multiplier`, the logits divided by `logits_scaling`; the released models tie the LM head
to the embeddings. The experts are stored as fused stacks, as IBM's parallel-experts layout has
them: `block_sparse_moe.input_linear` [e, 2f, d] (gate rows, then up rows), `output_linear` [e, d, f],
the router `block_sparse_moe.router.layer` [e, d] (transformers 5's state dict renames them
`experts.gate_up_proj`, `experts.down_proj`, `router.weight`). granitemoeshared adds an always-on
SwiGLU `shared_mlp` of `shared_intermediate_size` without a gate, stored fused the same way
(`input_linear` [2s, d], `output_linear` [d, s]) and added to the experts' output."""
from __future__ import annotations

from moecli.errors import ConfigError
from moecli.model.config import DAMAGED, ModelConfig
from moecli.checkpoints.families.common import Fields, Parts, Target, TensorMap, TensorSpec, base_fields, rope_from_hf


PARTS = Parts(attention="gqa", router="softmax_topk", norm="rms")


def config_from_hf(hf: dict) -> ModelConfig:
    family = hf.get("model_type")
    f = Fields(hf, family)
    base = base_fields(f)
    bias = f.get("attention_bias", False, bool)
    shared = f.get("shared_intermediate_size", 0) if family == "granitemoeshared" else 0
    logits_scaling = f.get("logits_scaling", 1.0, float)
    if logits_scaling <= 0:
        raise ConfigError(f"logits_scaling must be positive, got {logits_scaling}", DAMAGED)
    return ModelConfig(
        **base, **PARTS.fields(), d_ff=0, d_expert=f.need("intermediate_size"),
        n_experts=f.get("num_local_experts", 8), moe_layers=(True,) * base["n_layers"], norm_topk_prob=True,
        d_shared_expert=shared, shared_expert_gate=False, rope=rope_from_hf(f, 1e4), qkv_bias=bias, o_bias=bias,
        embedding_scale=f.get("embedding_multiplier", 1.0, float),
        residual_scale=f.get("residual_multiplier", 1.0, float),
        logits_scale=1.0 / logits_scaling,
        attention_scale=f.get("attention_multiplier", 1.0, float))


def fused_swiglu(gate: Target, up: Target, f: int, shape: tuple[int, ...]) -> TensorSpec:
    """A [..., 2f, d] tensor whose first f rows are the gate's and the last f the up projection's."""
    return TensorSpec(shape, (gate._replace(rows=(0, f)), up._replace(rows=(f, 2 * f))))


def moe_tensors(c: ModelConfig, layer: int, hf: str, module: str) -> TensorMap:
    d, f, n = c.d_model, c.d_expert, c.n_experts
    block, gate, up = f"{hf}.block_sparse_moe", Target(module, "w_gate"), Target(module, "w_up")
    table: TensorMap = {}
    for fused, down, router in (("input_linear.weight", "output_linear.weight", "router.layer.weight"),  # the Hub's
                                ("experts.gate_up_proj", "experts.down_proj", "router.weight")):  # transformers 5's
        table[f"{block}.{fused}"] = fused_swiglu(gate, up, f, (n, 2 * f, d))
        table[f"{block}.{down}"] = TensorSpec((n, d, f), (Target(module, "w_down"),))
        table[f"{block}.{router}"] = TensorSpec((n, d), (Target(module, "router"),))
    if c.d_shared_expert:
        s, shared = c.d_shared_expert, f"{module}/shared_expert"
        table[f"{hf}.shared_mlp.input_linear.weight"] = fused_swiglu(
            Target(f"{shared}/gate_proj", "w"), Target(f"{shared}/up_proj", "w"), s, (2 * s, d))
        table[f"{hf}.shared_mlp.output_linear.weight"] = TensorSpec((d, s), (Target(f"{shared}/down_proj", "w"),))
    return table
