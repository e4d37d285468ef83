"""The model's hyperparameters, one dataclass with every one of them independent.

Nothing here is derived from anything else: `head_dim` is not `d_model // n_heads`, the expert
FFN size is not the dense FFN size, and which layers are MoE is an explicit tuple. Checkpoint
families (`moecli.checkpoints.families`) translate their `config.json` into a `ModelConfig`,
naming the parts their layers use: `attention` (`moecli.model.attention.ATTENTION`), `router`
(`moecli.model.router.ROUTERS`) and `norm` (`moecli.model.norms.NORMS`).
"""
from __future__ import annotations

import dataclasses
import math

from moecli.errors import ConfigError

DAMAGED = "the checkpoint's config.json is damaged; re-download it"
MAX_DIM = 2**31 - 1        # any one size (vocabulary, width, heads, experts, context)
MAX_LAYERS = 10_000
MAX_PARAMS = 2**48         # far beyond any model; keeps every shape computation in int64


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (see `moecli.model.rope.rope_frequencies`)."""

    theta: float = 10000.0
    kind: str = "default"          # default | linear | yarn | llama3 | longrope
    factor: float = 1.0            # context extension factor (linear, yarn)
    original_max_positions: int = 0  # yarn: the context length the model was trained with
    beta_fast: float = 32.0        # yarn: ramp boundaries, in rotations
    beta_slow: float = 1.0
    attention_factor: float = 1.0  # yarn: scales cos/sin ("mscale")
    truncate: bool = True          # yarn: round the ramp boundaries to whole dimensions
    low_freq_factor: float = 1.0   # llama3: wavelengths over original_max_positions / low_freq_factor interpolated,
    high_freq_factor: float = 4.0  # ... under original_max_positions / high_freq_factor kept, smoothly between
    factors: tuple[float, ...] = ()  # longrope: one divisor per frequency (Phi-3's short_factor); cos/sin x attention_factor

    def validate(self) -> None:
        """ConfigError for settings `moecli.model.rope.rope_frequencies` cannot compute with."""
        finite = all(math.isfinite(x) for x in (self.theta, self.factor, self.beta_fast, self.beta_slow,
                                                 self.attention_factor))
        if not finite or self.theta <= 0 or self.factor <= 0:
            raise ConfigError(f"rope parameters must be finite with theta > 0 and factor > 0, got theta="
                              f"{self.theta}, factor={self.factor}", DAMAGED)
        if self.kind == "yarn" and not (self.theta > 1 and self.beta_fast > 0 and self.beta_slow > 0
                                        and self.original_max_positions > 0):
            raise ConfigError("yarn rope parameters need rope_theta > 1, beta_fast > 0, beta_slow > 0 and "
                              f"original_max_position_embeddings > 0, got {self}", DAMAGED)
        if self.kind == "llama3" and not (self.original_max_positions > 0 and 0 < self.low_freq_factor
                                          < self.high_freq_factor and math.isfinite(self.high_freq_factor)):
            raise ConfigError("llama3 rope parameters need original_max_position_embeddings > 0 and 0 < "
                              f"low_freq_factor < high_freq_factor, got {self}", DAMAGED)
        if self.kind == "longrope" and not (self.factors and all(math.isfinite(x) and x > 0 for x in self.factors)):
            raise ConfigError(f"longrope needs positive rescale factors, got {self.factors[:4]}...", DAMAGED)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Which weights are stored as integers, at how many bits (0: float), in groups of `group`
    weights along the input dimension (`moecli.model.quant`). Kinds as `moecli.model.quant.RULES`
    names them: the routed experts, the other Linear layers of the decoder, the LM head.
    `experts_format` "mxfp4": the experts are 4-bit floats in blocks of 32 with power-of-two scales
    instead (`moecli.model.mxfp4`, as gpt-oss ships them); `experts` is then 4. "fp8": the experts are
    e4m3 bytes with a float32 scale per `block` (rows, columns) of their [out, in] matrices, as a block-FP8
    checkpoint stores them (`moecli.model.fp8`); `experts` is then 8."""

    experts: int = 0
    dense: int = 0
    lm_head: int = 0
    group: int = 32
    experts_format: str = "int"   # int | mxfp4 | fp8
    block: tuple[int, int] = (128, 128)  # fp8: the [out, in] block one scale covers

    @classmethod
    def preset(cls, bits: int) -> "QuantConfig":
        """`--quantize q{bits}`: experts and dense layers at `bits`; the LM head at 8 bits either way
        (one matrix read once a token, where 4-bit logits cost more quality than they save)."""
        return cls(experts=bits, dense=bits, lm_head=8 if bits else 0)

    def __bool__(self) -> bool:
        return bool(self.experts or self.dense or self.lm_head)

    def label(self) -> str:
        """"q4", "q8", or the bits per kind when they differ ("experts q4, dense float, lm_head float")."""
        kinds = {"experts": self.experts, "dense": self.dense, "lm_head": self.lm_head}
        if self == QuantConfig.preset(self.experts):
            return f"q{self.experts}"
        names = {b: f"q{b}" for b in (4, 8)} | {0: "float"}
        return ", ".join(f"{k} {self.experts_format if k == 'experts' and self.experts_format != 'int' else names[b]}"
                         for k, b in kinds.items())

    def validate(self) -> None:
        if any(b not in (0, 4, 8) for b in (self.experts, self.dense, self.lm_head)):
            raise ConfigError(f"quantized weights must have 4 or 8 bits, got {self}")
        if not (self.group >= 2 and self.group & (self.group - 1) == 0):
            raise ConfigError(f"the quantization group size must be a power of two >= 2, got {self.group}")
        if (self.experts_format not in ("int", "mxfp4", "fp8") or (self.experts_format == "mxfp4" and self.experts != 4)
                or (self.experts_format == "fp8" and (self.experts != 8 or min(self.block) < 1))):
            raise ConfigError(f"experts_format must be int, mxfp4 with 4-bit experts or fp8 with 8-bit ones, got {self}")


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention's sizes (DeepSeek-V2/V3, `moecli.model.mla`). Each head's queries and keys
    have qk_nope_head_dim + qk_rope_head_dim dimensions (`ModelConfig.head_dim`), its values v_head_dim;
    the cache holds kv_lora_rank + qk_rope_head_dim values per token and layer, for all heads together."""

    kv_lora_rank: int              # the compressed key/value latent of each token
    qk_nope_head_dim: int          # per head: the query/key part without position, up-projected from the latent
    qk_rope_head_dim: int          # per head: the query part with RoPE; keys share one such part across heads
    v_head_dim: int                # per head: the values, up-projected from the latent
    q_lora_rank: int = 0           # the queries' low-rank bottleneck (0: one q_proj, as in DeepSeek-V2-Lite)
    rope_interleave: bool = True   # RoPE rotates dimension pairs (2i, 2i + 1) (DeepSeek), else (i, i + d/2)
    softmax_mscale: float = 1.0    # the softmax scale is head_dim^-0.5 times this (YaRN's mscale_all_dim, squared)
    norm_eps: float = 1e-6         # the latents' RMSNorms (transformers builds them with the default eps)

    def validate(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank"):
            low = 0 if name in ("q_lora_rank", "qk_nope_head_dim") else 1
            if not low <= getattr(self, name) <= MAX_DIM:
                raise ConfigError(f"{name} must be between {low} and {MAX_DIM}, got {getattr(self, name)}", DAMAGED)
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even for rotary embeddings, got {self.qk_rope_head_dim}",
                              DAMAGED)
        if not (math.isfinite(self.softmax_mscale) and self.softmax_mscale > 0 and math.isfinite(self.norm_eps)
                and self.norm_eps >= 0):
            raise ConfigError(f"the softmax mscale must be positive and the latent norms' eps >= 0, got "
                              f"{self.softmax_mscale} and {self.norm_eps}", DAMAGED)


@dataclasses.dataclass(frozen=True)
class DeltaNetConfig:
    """Gated DeltaNet linear attention's sizes (Qwen3-Next, Qwen3.5: `moecli.model.deltanet`). n_v_heads value
    heads share n_k_heads query/key heads in groups; `layout` is how the input projections are stored:
    "grouped" (Qwen3-Next: in_proj_qkvz and in_proj_ba, per key head) or "split" (Qwen3.5: in_proj_qkv, _z, _b, _a)."""

    n_k_heads: int
    n_v_heads: int
    k_head_dim: int
    v_head_dim: int
    conv_kernel: int = 4          # the causal depthwise convolution's width
    layout: str = "grouped"       # grouped | split
    chunk: int = 64               # the chunked form's block length for prompts

    def validate(self) -> None:
        for name in ("n_k_heads", "n_v_heads", "k_head_dim", "v_head_dim", "conv_kernel", "chunk"):
            if not 1 <= getattr(self, name) <= MAX_DIM:
                raise ConfigError(f"linear attention's {name} must be between 1 and {MAX_DIM}, got "
                                  f"{getattr(self, name)}", DAMAGED)
        if self.n_v_heads % self.n_k_heads or self.layout not in ("grouped", "split"):
            raise ConfigError(f"linear_num_value_heads ({self.n_v_heads}) must be a multiple of linear_num_key_heads "
                              f"({self.n_k_heads}), layout grouped or split (got {self.layout!r})", DAMAGED)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every hyperparameter of the MoE transformer, independent of the others."""

    family: str                   # the checkpoint's model_type (mixtral, qwen2_moe, ...)
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int                  # query heads
    n_kv_heads: int               # key/value heads: n_heads for MHA, 1 for MQA, between for GQA
    head_dim: int
    d_ff: int                     # dense MLP hidden size (dense layers only)
    d_expert: int                 # each expert's hidden size
    n_experts: int
    top_k: int
    moe_layers: tuple[bool, ...]  # per layer: True = MoE block, False = dense MLP
    d_shared_expert: int = 0      # always-on shared expert(s)' hidden size (0 = none)
    shared_expert_gate: bool = True  # the shared expert's output scaled by a sigmoid gate (Qwen2-MoE); DeepSeek: none
    n_group: int = 1              # group-limited routing (moecli.model.router.group_mask): groups of experts
    topk_group: int = 1           # ... and how many groups each token may use
    routed_scaling_factor: float = 1.0  # the routed experts' weights scaled by this (DeepSeek, GLM-4.5)
    expert_act: str = "swiglu"    # the experts' gated activation (moecli.model.experts.GLUS): swiglu | clamped_swiglu
    swiglu_limit: float = 7.0     # clamped_swiglu (gpt-oss): gate clamped above at it, up to [-limit, limit]
    swiglu_alpha: float = 1.702   # clamped_swiglu: gate * sigmoid(alpha * gate)
    expert_bias: bool = False     # biases on the experts' gate, up and down projections (gpt-oss)
    norm_topk_prob: bool = True   # renormalise the top-k gate weights to sum to 1
    norm_min: float = 0.0         # ... dividing by max(their sum, norm_min) (ERNIE-4.5's moe_norm_min)
    selection_bias: bool = False  # softmax_topk: a learned bias on the probabilities, to choose the top_k only (ERNIE-4.5)
    sparsemixer_eps: float = 0.0  # sparsemixer (Phi-3.5-MoE's router_jitter_noise): the relative logit gap kept in each softmax
    capacity_factor: float = 0.0  # 0 = dropless routing; > 0 = capacity routing
    quant: QuantConfig = QuantConfig()  # float weights unless --quantize or a quantized checkpoint
    rope: RopeConfig = RopeConfig()
    rotary_dim: int = 0           # RoPE on each head's first rotary_dim dims only (partial rotary); 0 = the whole head
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False        # biases on the dense MLPs' and shared experts' projections (ERNIE-4.5's use_bias)
    lm_head_bias: bool = False    # a bias on the logits (ERNIE-4.5's use_bias)
    rope_interleave: bool = False  # gqa: RoPE rotates dimension pairs (2i, 2i + 1), not (i, i + d/2) (ERNIE-4.5)
    qk_norm: str = "none"         # none | head (per head, Qwen3) | full (whole projection, OLMoE) | l2 (per head,
                                  # no weights, RoPE layers only: Llama-4) | head_after_rope (per head, with
                                  # weights, after RoPE: Hunyuan-A13B)
    clip_qkv: float | None = None
    attention_sinks: bool = False  # a learned per-head logit in every softmax denominator (gpt-oss)
    mla: MLAConfig | None = None  # multi-head latent attention's sizes (attention "mla"; head_dim = q/k head size)
    deltanet: DeltaNetConfig | None = None  # Gated DeltaNet's sizes (layers of attention "deltanet")
    layer_attention: tuple[str, ...] = ()  # per layer: its attention kind (empty = `attention` on every layer)
    attn_output_gate: bool = False  # gqa: q_proj also gives a per-head sigmoid gate on the output (Qwen3-Next)
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer: window applies (empty = every layer)
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Scalar multipliers (IBM Granite's muP-style embedding/attention/residual/logits multipliers; 1 elsewhere)
    embedding_scale: float = 1.0  # the embeddings times this
    residual_scale: float = 1.0   # each residual branch (attention, feed-forward) times this before it is added
    logits_scale: float = 1.0     # the logits times this (Granite: 1 / logits_scaling)
    attention_scale: float | None = None  # the softmax scale of q.k (None: 1 / sqrt(head_dim))
    # Llama-4 (moecli.model.attention, moecli.model.moe): RoPE on some layers only (the others "NoPE"), chunked
    # attention, the NoPE layers' query temperature, the router's weight scaling each expert's input.
    rope_layers: tuple[bool, ...] = ()      # per layer: RoPE applies (empty = every layer)
    attention_chunk: int | None = None      # a query sees only keys of its own chunk of this many positions (causally)
    chunk_layers: tuple[bool, ...] = ()     # per layer: the chunk applies (empty = every layer)
    temperature_floor: float = 0.0          # NoPE layers scale q by 1 + temperature_scale * log1p(floor((pos + 1) /
    temperature_scale: float = 0.1          # temperature_floor)); 0 = off (Llama-4's attn_temperature_tuning)
    router_scales_input: bool = False       # the expert sees x * weight and its output counts once (Llama-4)
    # The parts, by name (see the module docstring).
    attention: str = "gqa"
    router: str = "softmax_topk"
    norm: str = "rms"

    def __post_init__(self):
        # Everything a damaged config.json could get wrong is caught here, as one ConfigError naming the
        # field, before any shape is computed from it.
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "max_position_embeddings"):
            if not 0 < getattr(self, name) <= MAX_DIM:
                raise ConfigError(f"{name} must be between 1 and {MAX_DIM}, got {getattr(self, name)}", DAMAGED)
        for name in ("d_ff", "d_expert", "n_experts", "top_k", "d_shared_expert"):
            if not 0 <= getattr(self, name) <= MAX_DIM:
                raise ConfigError(f"{name} must be between 0 and {MAX_DIM}, got {getattr(self, name)}", DAMAGED)
        if self.n_layers > MAX_LAYERS:
            raise ConfigError(f"n_layers={self.n_layers} is more than moecli supports ({MAX_LAYERS})", DAMAGED)
        if len(self.moe_layers) != self.n_layers:
            raise ConfigError(f"moe_layers has {len(self.moe_layers)} entries for {self.n_layers} layers")
        for name in ("rope_layers", "chunk_layers"):
            if getattr(self, name) and len(getattr(self, name)) != self.n_layers:
                raise ConfigError(f"{name} has {len(getattr(self, name))} entries for {self.n_layers} layers", DAMAGED)
        if not (math.isfinite(self.temperature_floor) and self.temperature_floor >= 0
                and math.isfinite(self.temperature_scale)):
            raise ConfigError(f"floor_scale must be >= 0 and attn_scale finite, got {self.temperature_floor} and "
                              f"{self.temperature_scale}", DAMAGED)
        if self.sliding_layers and len(self.sliding_layers) != self.n_layers:
            raise ConfigError(f"layer_types has {len(self.sliding_layers)} entries for {self.n_layers} layers",
                              DAMAGED)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.n_heads}) is not a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})")
        if self.head_dim % 2 and self.mla is None:  # latent attention rotates only its qk_rope_head_dim part
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}", DAMAGED)
        if self.layer_attention and len(self.layer_attention) != self.n_layers:
            raise ConfigError(f"layer_types has {len(self.layer_attention)} entries for {self.n_layers} layers", DAMAGED)
        if ("deltanet" in (self.attention, *self.layer_attention)) != (self.deltanet is not None):
            raise ConfigError(f"attention kinds {self.layer_attention or self.attention} with deltanet={self.deltanet}: "
                              "linear attention needs its sizes")
        if self.deltanet is not None:
            self.deltanet.validate()
        if (self.attention == "mla") != (self.mla is not None):
            raise ConfigError(f"attention {self.attention!r} with mla={self.mla}: latent attention needs its sizes")
        if self.mla is not None:
            self.mla.validate()
            if self.head_dim != self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim:
                raise ConfigError(f"head_dim={self.head_dim} must be qk_nope_head_dim + qk_rope_head_dim", DAMAGED)
        if not 0 <= self.rotary_dim <= self.head_dim or self.rotary_dim % 2:
            raise ConfigError(f"the rotary part of each head must be even and at most head_dim={self.head_dim}, "
                              f"got {self.rotary_dim}", DAMAGED)
        if any(self.moe_layers):
            if not 1 <= self.top_k <= self.n_experts:
                raise ConfigError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
            if self.d_expert <= 0:
                raise ConfigError(f"the experts' hidden size must be positive, got {self.d_expert}", DAMAGED)
        if not all(self.moe_layers) and self.d_ff <= 0:
            raise ConfigError(f"the dense layers' intermediate_size must be positive, got {self.d_ff}", DAMAGED)
        if not (math.isfinite(self.norm_eps) and self.norm_eps >= 0):
            raise ConfigError(f"rms_norm_eps must be a finite number >= 0, got {self.norm_eps}", DAMAGED)
        self.quant.validate()
        if any(self.moe_layers) and not (self.n_group >= 1 and self.n_experts % self.n_group == 0
                                         and 1 <= self.topk_group <= self.n_group):
            raise ConfigError(f"n_group={self.n_group} must divide n_experts={self.n_experts} and topk_group="
                              f"{self.topk_group} be between 1 and n_group", DAMAGED)
        if not math.isfinite(self.swiglu_alpha):
            raise ConfigError(f"swiglu_alpha must be finite, got {self.swiglu_alpha}", DAMAGED)
        if self.router == "sparsemixer" and any(self.moe_layers) and self.top_k != 2:
            raise ConfigError(f"sparsemixer routing chooses 2 experts, got top_k={self.top_k}", DAMAGED)
        if not (math.isfinite(self.sparsemixer_eps) and self.sparsemixer_eps >= 0):
            raise ConfigError(f"sparsemixer_eps (router_jitter_noise) must be >= 0, got {self.sparsemixer_eps}", DAMAGED)
        if not (math.isfinite(self.norm_min) and self.norm_min >= 0):
            raise ConfigError(f"norm_min (moe_norm_min) must be a finite number >= 0, got {self.norm_min}", DAMAGED)
        if not math.isfinite(self.routed_scaling_factor):
            raise ConfigError(f"routed_scaling_factor must be finite, got {self.routed_scaling_factor}", DAMAGED)
        if not (math.isfinite(self.capacity_factor) and self.capacity_factor >= 0):
            raise ConfigError(f"capacity_factor must be >= 0, got {self.capacity_factor}")
        for name in ("sliding_window", "clip_qkv", "swiglu_limit", "attention_chunk", "embedding_scale", "residual_scale", "logits_scale",
                     "attention_scale"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be positive, got {value}", DAMAGED)
        self.rope.validate()
        bound = self.parameter_bound()
        if bound > MAX_PARAMS:
            raise ConfigError(f"config.json describes a model of up to {bound:.3g} parameters", DAMAGED)

    def attention_of(self, layer: int) -> str:
        """The layer's attention kind (`moecli.model.attention.ATTENTION`): layers may mix kinds (Qwen3-Next)."""
        return self.layer_attention[layer] if self.layer_attention else self.attention

    def uses_window(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return not self.sliding_layers or self.sliding_layers[layer]

    def uses_rope(self, layer: int) -> bool:
        return not self.rope_layers or self.rope_layers[layer]

    def uses_chunk(self, layer: int) -> bool:
        if self.attention_chunk is None:
            return False
        return not self.chunk_layers or self.chunk_layers[layer]

    def capacity(self, n_tokens: int) -> int:
        """Slots per expert in capacity mode: ceil(capacity_factor * tokens * top_k / n_experts)."""
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts))

    def expert_size(self) -> int:
        """Parameters of one routed expert: a SwiGLU's gate, up and down matrices (and their biases)."""
        biases = 2 * self.d_expert + self.d_model if self.expert_bias else 0
        return 3 * self.d_model * self.d_expert + biases

    def expert_parameters(self) -> int:
        """Parameters of all routed experts (the part expert parallelism splits over devices)."""
        return sum(self.moe_layers) * self.n_experts * self.expert_size()

    def parameter_bound(self) -> int:
        """A cheap upper bound on the parameter count, to refuse a damaged config.json's absurd sizes
        before any shape is built (the exact counts trace the model: `moecli.model.sizes.parameter_counts`).
        Every parameter of a layer is a row of at most max(widths) + 1 entries (+1: biases, norms) times
        an output width, and the layer's output widths sum to less than `outputs`; no family's formula."""
        m = self.mla
        ranks = (m.q_lora_rank, m.kv_lora_rank + m.qk_rope_head_dim, self.n_heads * m.v_head_dim) if m else ()
        widths = (self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.d_ff,
                  self.d_expert, self.d_shared_expert, *ranks)
        outputs = 4 * sum(widths) + self.n_experts * (2 * self.d_expert + self.d_model + 3) + 8
        return self.n_layers * (max(widths) + 1) * outputs + (2 * self.vocab_size + 1) * self.d_model

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

