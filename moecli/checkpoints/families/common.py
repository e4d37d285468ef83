"""What every checkpoint family shares: reading config.json fields with clear errors, RoPE
settings, and the table from Hugging Face tensor names to moecli's parameters.

A family module (mixtral.py, qwen_moe.py, olmoe.py) is declarations, not model code:
    PARTS = Parts(attention=..., router=..., norm=...)    # which of moecli/model/'s parts it uses
    config_from_hf(hf: dict) -> ModelConfig                # its config.json read into them (**PARTS)
    moe_tensors(config, layer, hf_prefix, module) -> TensorMap   # its MoE block's tensor names
    attention_tensors(config, layer, hf_prefix, module) -> TensorMap  # optional: its attention's (default: GQA's)
    ignored_tensors(hf: dict) -> tuple[str, ...]           # optional: name prefixes the loader skips
The norms' and dense layers' tensor names are the Hugging Face ones every family shares, and so
are grouped-query attention's (`tensor_map`, `gqa_tensors`); `moecli.checkpoints.families`
registers the module under its model_type(s), and
`moecli.checkpoints.loader` does the rest.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

from moecli.model.config import DAMAGED, MAX_DIM, MAX_LAYERS, ModelConfig, RopeConfig
from moecli.errors import QUANTIZED_HINT, ConfigError


class Target(NamedTuple):
    """Where (part of) a checkpoint tensor goes in the Haiku parameter tree."""

    module: str                  # e.g. "transformer/layer_0/attn/q_proj"
    param: str                   # e.g. "w"
    expert: int | None = None    # index on the stacked experts axis; None = the whole parameter
    transpose: bool = True       # torch Linear stores [out, in]; Haiku uses [in, out]
    rows: tuple[int, int] | None = None  # a slice of the tensor's out axis (fused gate_up_proj)
    stride: int = 1              # ... every stride-th of those (gpt-oss interleaves gate and up)
    shape: tuple[int, ...] | None = None  # reshaped to this (ERNIE-4.5's selection bias: [1, n] -> [n])

    def select(self, tensor):
        """The part of `tensor` this target takes: `rows[0]:rows[1]:stride` of its out axis, axis -2 of a
        torch [out, in] weight (transpose) and the last axis of a tensor stored [in, out] or of a bias."""
        if self.shape is not None:
            return tensor.reshape(self.shape)
        if self.rows is None:
            return tensor
        index = [slice(None)] * tensor.ndim
        index[-2 if self.transpose else -1] = slice(self.rows[0], self.rows[1], self.stride)
        return tensor[tuple(index)]


class Parts(NamedTuple):
    """The parts a family's layers use, by their names in moecli/model/'s registries."""

    attention: str = "gqa"            # moecli.model.attention.ATTENTION
    router: str = "softmax_topk"      # moecli.model.router.ROUTERS
    norm: str = "rms"                 # moecli.model.norms.NORMS

    def fields(self) -> dict:
        return self._asdict()


class TensorSpec(NamedTuple):
    shape: tuple[int, ...]       # the shape the checkpoint must have
    targets: tuple[Target, ...]


TensorMap = dict[str, TensorSpec]


#: Inclusive bounds on config.json's integer fields: a value outside them is a damaged config, caught
#: here before a family builds per-layer tuples or shapes from it.
INT_RANGES: dict[str, tuple[int, int]] = {
    **dict.fromkeys(("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                     "moe_intermediate_size", "max_position_embeddings", "original_max_position_embeddings",
                     "sliding_window"), (1, MAX_DIM)),
    **dict.fromkeys(("head_dim", "intermediate_size", "shared_expert_intermediate_size", "num_local_experts",
                     "num_experts", "num_experts_per_tok", "max_window_layers"), (0, MAX_DIM)),
    "num_hidden_layers": (1, MAX_LAYERS),
    # GLM-4.5 / MiniMax-M2 (and DeepSeek-style configs)
    **dict.fromkeys(("rotary_dim", "n_routed_experts", "n_shared_experts"), (0, MAX_DIM)),
    **dict.fromkeys(("num_nextn_predict_layers", "num_mtp_modules", "first_k_dense_replace"), (0, MAX_LAYERS)),
    "decoder_sparse_step": (1, MAX_LAYERS),
    # DeepSeek-V2/V3's latent attention and routing (families/deepseek.py)
    **dict.fromkeys(("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"), (1, MAX_DIM)),
    **dict.fromkeys(("q_lora_rank", "qk_nope_head_dim", "n_group", "topk_group"), (0, MAX_DIM)),
    "moe_layer_freq": (1, MAX_LAYERS),
    # ERNIE-4.5 (families/ernie.py)
    **dict.fromkeys(("moe_k", "moe_num_experts", "moe_num_shared_experts"), (0, MAX_DIM)),
    "moe_layer_interval": (1, MAX_LAYERS),
    # Llama-4 (families/llama4.py)
    "intermediate_size_mlp": (0, MAX_DIM), "attention_chunk_size": (1, MAX_DIM),
    **dict.fromkeys(("no_rope_layer_interval", "interleave_moe_layer_step"), (1, MAX_LAYERS)),
}


class Fields:
    """Typed access to config.json with one-line errors naming the field."""

    def __init__(self, hf: dict, family: str):
        self.hf, self.family = hf, family

    def _check(self, key: str, value: Any, kind: type) -> Any:
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            try:
                value, ok = float(value), True
            except OverflowError:
                ok = False
        if ok and kind is float and not math.isfinite(value):
            ok = False
        if not ok:
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ConfigError(f"config.json field {key!r} must be {'a finite ' if kind is float else ''}"
                              f"{kind.__name__}, got {shown}", DAMAGED)
        if kind is int and key in INT_RANGES and not INT_RANGES[key][0] <= value <= INT_RANGES[key][1]:
            low, high = INT_RANGES[key]
            raise ConfigError(f"config.json field {key!r} must be between {low} and {high}, got {value}", DAMAGED)
        return value

    def need(self, key: str, kind: type = int, alias: str | None = None) -> Any:
        """A required field; `alias` is another name transformers may save it under."""
        if self.hf.get(key) is None and alias and self.hf.get(alias) is not None:
            key = alias
        if self.hf.get(key) is None:
            raise ConfigError(f"config.json for {self.family} lacks {key!r}",
                              "the checkpoint's config.json is incomplete; re-download it")
        return self._check(key, self.hf[key], kind)

    def get(self, key: str, default: Any, kind: type = int) -> Any:
        value = self.hf.get(key)
        return default if value is None else self._check(key, value, kind)


def rope_from_hf(f: Fields, default_theta: float) -> RopeConfig:
    """RoPE settings from top-level rope_theta/rope_scaling (transformers 4) or rope_parameters
    (transformers 5)."""
    params = f.hf.get("rope_parameters") or f.hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json rope parameters must be an object, got {type(params).__name__}", DAMAGED)
    p = Fields(params, f.family)
    theta = p.get("rope_theta", f.get("rope_theta", default_theta, float), float)
    kind = p.get("rope_type", p.get("type", "default", str), str)
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=p.need("factor", float))
    if kind == "yarn":
        max_pos = f.get("max_position_embeddings", 4096)
        original = p.get("original_max_position_embeddings", max_pos)  # >= 1: see INT_RANGES
        factor = p.get("factor", max_pos / original, float)
        if factor <= 0:
            raise ConfigError(f"rope factor must be positive, got {factor}", DAMAGED)

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = p.get("attention_factor", None, float)
        if attention_factor is None:
            m, m_all = p.get("mscale", 0.0, float), p.get("mscale_all_dim", 0.0, float)
            divisor = mscale(factor, m_all) if m and m_all else 1.0
            if divisor == 0:
                raise ConfigError(f"rope mscale_all_dim={m_all} gives no usable attention factor", DAMAGED)
            attention_factor = mscale(factor, m) / divisor if m and m_all else mscale(factor)
        return RopeConfig(theta=theta, kind="yarn", factor=factor, original_max_positions=original,
                          beta_fast=p.get("beta_fast", 32.0, float), beta_slow=p.get("beta_slow", 1.0, float),
                          attention_factor=attention_factor, truncate=p.get("truncate", True, bool))
    if kind == "llama3":  # Llama 3.1 / Llama-4
        return RopeConfig(theta=theta, kind="llama3", factor=p.need("factor", float),
                          original_max_positions=p.need("original_max_position_embeddings"),
                          low_freq_factor=p.need("low_freq_factor", float),
                          high_freq_factor=p.need("high_freq_factor", float))
    raise ConfigError(f"rope type {kind!r} is not supported", "supported: default, linear, yarn, llama3")


def check_activation(f: Fields) -> None:
    act = f.get("hidden_act", "silu", str)
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported", "moecli's experts are SwiGLU (silu)")


def check_quantization(f: Fields) -> None:
    """Quantized checkpoints moecli reads pass (compressed-tensors W4A16/W8A16; see
    `moecli.checkpoints.quantized.quant_config_for`; block-FP8, `moecli.checkpoints.fp8`); others
    (GPTQ, AWQ, bitsandbytes, per-tensor FP8, ...) are refused with a hint."""
    from moecli.checkpoints import compressed_tensors, fp8

    if compressed_tensors.parse_config(f.hf) is not None:  # raises for the schemes it cannot read
        return
    if fp8.parse_config(f.hf) is not None:  # block-FP8, dequantized at load (raises for other FP8 variants)
        return
    from moecli.checkpoints import mxfp4

    if mxfp4.parse_config(f.hf):  # gpt-oss's MXFP4 experts, kept packed (raises for other families)
        return
    quant = f.hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise ConfigError(f"quantized checkpoints are not supported (config.json has a quantization_config"
                          f"{f', method {method}' if isinstance(method, str) else ''})", QUANTIZED_HINT)


def eos_ids(f: Fields) -> tuple[int, ...]:
    eos = f.hf.get("eos_token_id")
    if isinstance(eos, list):
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
            raise ConfigError(f"config.json field 'eos_token_id' must be an int or a list of ints, got "
                              f"{str(eos)[:60]}", DAMAGED)
        return tuple(eos)
    return () if eos is None else (f.get("eos_token_id", 0),)


def base_fields(f: Fields) -> dict:
    """The ModelConfig fields every family reads the same way."""
    check_quantization(f)
    check_activation(f)
    d_model, n_heads = f.need("hidden_size"), f.need("num_attention_heads")
    n_layers = f.need("num_hidden_layers")
    head_dim = f.get("head_dim", 0) or (d_model // n_heads if n_heads else 0)
    return dict(
        family=f.family, vocab_size=f.need("vocab_size"), d_model=d_model, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=f.get("num_key_value_heads", n_heads), head_dim=head_dim,
        top_k=f.need("num_experts_per_tok"), norm_eps=f.get("rms_norm_eps", 1e-6, float),
        tie_embeddings=f.get("tie_word_embeddings", False, bool),
        max_position_embeddings=f.get("max_position_embeddings", 4096),
        bos_token_id=f.get("bos_token_id", None), eos_token_ids=eos_ids(f),
    )


# ----------------------------------------------------------------------------- tensor names

def _linear(name: str, module: str, n_out: int, n_in: int, bias: bool) -> TensorMap:
    table = {f"{name}.weight": TensorSpec((n_out, n_in), (Target(module, "w"),))}
    if bias:
        table[f"{name}.bias"] = TensorSpec((n_out,), (Target(module, "b", transpose=False),))
    return table


def _norm(name: str, module: str, dim: int, offset: bool = False) -> TensorMap:
    """A norm's weight -> "scale"; with `offset` (LayerNorm, `ModelConfig.norm` "layer") its bias -> "offset"."""
    table = {f"{name}.weight": TensorSpec((dim,), (Target(module, "scale", transpose=False),))}
    if offset:
        table[f"{name}.bias"] = TensorSpec((dim,), (Target(module, "offset", transpose=False),))
    return table


def swiglu_tensors(hf: str, module: str, d: int, f: int, bias: bool = False) -> TensorMap:
    """A SwiGLU MLP stored as gate_proj/up_proj/down_proj Linear layers (with biases: ERNIE-4.5)."""
    return {**_linear(f"{hf}.gate_proj", f"{module}/gate_proj", f, d, bias),
            **_linear(f"{hf}.up_proj", f"{module}/up_proj", f, d, bias),
            **_linear(f"{hf}.down_proj", f"{module}/down_proj", d, f, bias)}


def expert_tensors(c: ModelConfig, hf_block: str, module: str, names: tuple[str, str, str]) -> TensorMap:
    """Experts stored one tensor per expert (`{hf_block}.experts.{e}.{gate,up,down}.weight`) and,
    as an alternative, transformers' fused 3-D tensors (`experts.gate_up_proj`, `experts.down_proj`)."""
    d, f, n = c.d_model, c.d_expert, c.n_experts
    gate, up, down = names
    table: TensorMap = {}
    for e in range(n):
        prefix = f"{hf_block}.experts.{e}"
        table[f"{prefix}.{gate}.weight"] = TensorSpec((f, d), (Target(module, "w_gate", e),))
        table[f"{prefix}.{up}.weight"] = TensorSpec((f, d), (Target(module, "w_up", e),))
        table[f"{prefix}.{down}.weight"] = TensorSpec((d, f), (Target(module, "w_down", e),))
    table[f"{hf_block}.experts.gate_up_proj"] = TensorSpec(
        (n, 2 * f, d), (Target(module, "w_gate", rows=(0, f)), Target(module, "w_up", rows=(f, 2 * f))))
    table[f"{hf_block}.experts.down_proj"] = TensorSpec((n, d, f), (Target(module, "w_down"),))
    table[f"{hf_block}.gate.weight"] = TensorSpec((n, d), (Target(module, "router"),))
    return table


def gqa_tensors(c: ModelConfig, layer: int, hf: str, module: str) -> TensorMap:
    """Grouped-query attention's tensors, `{hf}.{q,k,v,o}_proj` (+ q/k norms, sinks), the names every
    family so far shares: the default `attention_tensors` of `tensor_map` (`hf` = "model.layers.{i}.self_attn",
    `module` = "transformer/layer_{i}/attn")."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    table = {**_linear(f"{hf}.q_proj", f"{module}/q_proj", q, c.d_model, c.qkv_bias),
             **_linear(f"{hf}.k_proj", f"{module}/k_proj", kv, c.d_model, c.qkv_bias),
             **_linear(f"{hf}.v_proj", f"{module}/v_proj", kv, c.d_model, c.qkv_bias),
             **_linear(f"{hf}.o_proj", f"{module}/o_proj", c.d_model, q, c.o_bias)}
    if c.attention_sinks:  # gpt-oss: one sink logit per query head
        table[f"{hf}.sinks"] = TensorSpec((c.n_heads,), (Target(module, "sinks", transpose=False),))
    if c.qk_norm in ("head", "full"):  # "l2" (Llama-4) has no weights
        q_norm, k_norm = {"head": (c.head_dim, c.head_dim), "full": (q, kv)}[c.qk_norm]
        table.update(_norm(f"{hf}.q_norm", f"{module}/q_norm", q_norm))
        table.update(_norm(f"{hf}.k_norm", f"{module}/k_norm", k_norm))
    return table


def tensor_map(c: ModelConfig, moe_tensors, attention_tensors=gqa_tensors) -> TensorMap:
    """The whole model's table; `moe_tensors(c, layer, hf_prefix, module)` adds a family's MoE block, and
    `attention_tensors(c, layer, hf_prefix, module)` its attention (a family module's optional
    `attention_tensors`; grouped-query attention's q/k/v/o_proj by default)."""
    table: TensorMap = {
        "model.embed_tokens.weight": TensorSpec((c.vocab_size, c.d_model),
                                                (Target("transformer/embed", "embeddings", transpose=False),)),
        **_norm("model.norm", "transformer/final_norm", c.d_model, c.norm == "layer"),
    }
    if not c.tie_embeddings:
        table["lm_head.weight"] = TensorSpec((c.vocab_size, c.d_model), (Target("transformer", "lm_head"),))
    if c.lm_head_bias:
        table["lm_head.bias"] = TensorSpec((c.vocab_size,), (Target("transformer", "lm_head_bias", transpose=False),))
    for i in range(c.n_layers):
        hf, mod = f"model.layers.{i}", f"transformer/layer_{i}"
        table.update(_norm(f"{hf}.input_layernorm", f"{mod}/input_norm", c.d_model, c.norm == "layer"))
        table.update(_norm(f"{hf}.post_attention_layernorm", f"{mod}/post_attn_norm", c.d_model,
                           c.norm == "layer"))
        table.update(attention_tensors(c, i, f"{hf}.self_attn", f"{mod}/attn"))
        if c.moe_layers[i]:
            table.update(moe_tensors(c, i, hf, f"{mod}/moe"))
        else:
            table.update(swiglu_tensors(f"{hf}.mlp", f"{mod}/mlp", c.d_model, c.d_ff, c.mlp_bias))
    return table


# ----------------------------------------------------------------------------- partial rotary, selection
# bias, multi-token-prediction layers (GLM-4.5, MiniMax-M2; DeepSeek-V3 shares the last two)

def rotary_dim_from_hf(f: Fields, head_dim: int, default_factor: float = 1.0) -> int:
    """ModelConfig.rotary_dim: int(head_dim * partial_rotary_factor), the factor read where transformers
    looks first (rope_parameters, then the top level, then the family's default); 0 = the whole head."""
    params = f.hf.get("rope_parameters") or f.hf.get("rope_scaling") or {}
    factor = Fields(params if isinstance(params, dict) else {}, f.family).get(
        "partial_rotary_factor", f.get("partial_rotary_factor", default_factor, float), float)
    if not 0 < factor <= 1:
        raise ConfigError(f"the rotary share of each head (partial_rotary_factor, or rotary_dim / head_dim) must be "
                          f"in (0, 1], got {factor}", DAMAGED)
    dim = int(head_dim * factor)
    return 0 if dim == head_dim else dim


def score_bias_tensor(name: str, module: str, n_experts: int) -> TensorMap:
    """The router's selection-only bias (`e_score_correction_bias`) -> sigmoid_topk's `score_bias`."""
    return {name: TensorSpec((n_experts,), (Target(module, "score_bias", transpose=False),))}


def mtp_layers(f: Fields, key: str, default: int) -> tuple[str, ...]:
    """Name prefixes of the `f[key]` multi-token-prediction modules stored as extra layers after the last
    decoder layer, `model.layers.{n_layers + i}.` (DeepSeek-V3's MTP, Liu et al. 2024; GLM-4.5,
    MiniMax-M2): they predict tokens further ahead for speculative decoding, which moecli does not do,
    so a family's `ignored_tensors` returns them and the loader skips them."""
    n_layers = f.need("num_hidden_layers")
    return tuple(f"model.layers.{n_layers + i}." for i in range(f.get(key, default)))
