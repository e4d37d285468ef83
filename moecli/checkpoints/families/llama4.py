"""Llama-4 (Meta 2025; Scout: 16 experts, Maverick: 128, both 17 B active). `llama4_text` is the text
model alone; `llama4` is the released multimodal checkpoint, whose text model is read from its
`text_config` and its `language_model.*` tensors, the vision tower (`vision_model.*`) and its projector
(`multi_modal_projector.*`) skipped: moecli runs text only.

The MoE layers (`moe_layers`, by default every `interleave_moe_layer_step`-th; the others dense SwiGLUs
of `intermediate_size_mlp`) route each token to its top-1 expert by the logit, weighted by its sigmoid,
and scale the expert's *input* by that weight (`topk_sigmoid`, `router_scales_input`); an ungated shared
expert of `intermediate_size` always runs. transformers stores the experts fused and already [in, out]:
gate_up_proj [e, d, 2f] (gate the first f columns, up the last f), down_proj [e, f, d].

Attention: three layers of four (`no_rope_layers`: 1 = RoPE) have RoPE on interleaved pairs (the
complex product), a weightless per-head q/k norm (`use_qk_norm`) and chunked attention
(`attention_chunk_size`, `layer_types`); the fourth has no position encoding ("NoPE"), full attention and
the query temperature `1 + attn_scale * log1p(floor((p + 1) / floor_scale))` (`attn_temperature_tuning`).
RoPE scaling is Llama 3.1's ("llama3").
"""
from __future__ import annotations

from moecli.model.config import DAMAGED, ModelConfig
from moecli.errors import ConfigError
from moecli.checkpoints.families.common import (Fields, Parts, Target, TensorMap, TensorSpec, base_fields,
                                                check_quantization, rope_from_hf, swiglu_tensors)

PARTS = Parts(attention="gqa", router="topk_sigmoid", norm="rms")  # chunks, NoPE layers, l2 q/k norm: gqa options

#: transformers' Llama4TextConfig defaults where they differ from what `base_fields` assumes for a missing field.
DEFAULTS = dict(head_dim=128, num_key_value_heads=8, rms_norm_eps=1e-5, num_experts_per_tok=1,
                max_position_embeddings=131072)
LAYER_TYPES = ("full_attention", "chunked_attention")
#: What the multimodal checkpoint holds that moecli does not load, and why (`moe generate --verbose`).
IGNORED_REASON = "as the vision tower and its projector: moecli runs the text model only"


def text_config(hf: dict) -> dict:
    """The text model's config: `text_config` of the multimodal `llama4`, else config.json itself."""
    if hf.get("model_type") != "llama4":
        return hf
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ConfigError("config.json for llama4 lacks a text_config object", DAMAGED)
    check_quantization(Fields(hf, "llama4"))
    return text


def config_from_hf(hf: dict) -> ModelConfig:
    family = hf.get("model_type")
    text = {**DEFAULTS, **text_config(hf)}  # a key present with null keeps null (transformers derives it)
    f = Fields(text, family)
    base = base_fields(f)
    n = base["n_layers"]
    interval, step = f.get("no_rope_layer_interval", 4), f.get("interleave_moe_layer_step", 1)  # >= 1: INT_RANGES
    rope = f.get("no_rope_layers", None, list) or [int((i + 1) % interval != 0) for i in range(n)]
    moe = f.get("moe_layers", None, list)
    moe = list(range(step - 1, n, step)) if moe is None else moe
    chunk = None if "attention_chunk_size" in text and text["attention_chunk_size"] is None else \
        f.get("attention_chunk_size", 8192)
    types = f.get("layer_types", None, list) or [LAYER_TYPES[bool(r and chunk is not None)] for r in rope]
    if len(rope) != n or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"config.json's no_rope_layers must have {n} entries and layer_types hold only "
                          f"{' and '.join(LAYER_TYPES)}", DAMAGED)
    floor = f.get("floor_scale", 8192, float) if f.get("attn_temperature_tuning", True, bool) else 0.0
    if floor < 0:
        raise ConfigError(f"config.json field 'floor_scale' must be positive, got {floor}", DAMAGED)
    bias, d_expert = f.get("attention_bias", False, bool), f.need("intermediate_size")
    return ModelConfig(
        **base, **PARTS.fields(), d_ff=f.get("intermediate_size_mlp", 16384), d_expert=d_expert,
        n_experts=f.need("num_local_experts"), moe_layers=tuple(i in moe for i in range(n)),
        d_shared_expert=d_expert, shared_expert_gate=False, norm_topk_prob=False, router_scales_input=True,
        rope=rope_from_hf(f, 500000.0), rope_interleave=True, qkv_bias=bias, o_bias=bias,
        qk_norm="l2" if f.get("use_qk_norm", True, bool) else "none",
        rope_layers=tuple(bool(r) for r in rope), attention_chunk=chunk,
        chunk_layers=tuple(t == "chunked_attention" for t in types), temperature_floor=floor,
        temperature_scale=f.get("attn_scale", 0.1, float))


def moe_tensors(c: ModelConfig, layer: int, hf: str, module: str) -> TensorMap:
    d, f, n = c.d_model, c.d_expert, c.n_experts
    block = f"{hf}.feed_forward"
    return {
        f"{block}.router.weight": TensorSpec((n, d), (Target(module, "router"),)),
        f"{block}.experts.gate_up_proj": TensorSpec((n, d, 2 * f), (
            Target(module, "w_gate", transpose=False, rows=(0, f)), Target(module, "w_up", transpose=False,
                                                                          rows=(f, 2 * f)))),
        f"{block}.experts.down_proj": TensorSpec((n, f, d), (Target(module, "w_down", transpose=False),)),
        **swiglu_tensors(f"{block}.shared_expert", f"{module}/shared_expert", d, f),
    }


def tensor_names(c: ModelConfig, table: TensorMap) -> TensorMap:
    """The shared table under Llama-4's names: dense layers' MLPs are `feed_forward` too, and the multimodal
    checkpoint keeps the text model under `language_model.`."""
    prefix = "language_model." if c.family == "llama4" else ""
    return {prefix + name.replace(".mlp.", ".feed_forward."): spec for name, spec in table.items()}


def ignored_tensors(hf: dict) -> tuple[str, ...]:
    return ("vision_model.", "multi_modal_projector.") if hf.get("model_type") == "llama4" else ()
