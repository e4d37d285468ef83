"""The model's hyperparameters, one dataclass with every one of them independent.

Nothing here is derived from anything else: `head_dim` is not `d_model // n_heads`, the expert
FFN size is not the dense FFN size, and which layers are MoE is an explicit tuple. Checkpoint
families (`moecli.families`) translate their `config.json` into a `ModelConfig`.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from moecli.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (see `moecli.layers.rope_frequencies`)."""

    theta: float = 10000.0
    kind: str = "default"          # default | linear | yarn
    factor: float = 1.0            # context extension factor (linear, yarn)
    original_max_positions: int = 0  # yarn: the context length the model was trained with
    beta_fast: float = 32.0        # yarn: ramp boundaries, in rotations
    beta_slow: float = 1.0
    attention_factor: float = 1.0  # yarn: scales cos/sin ("mscale")
    truncate: bool = True          # yarn: round the ramp boundaries to whole dimensions


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
    d_shared_expert: int = 0      # Qwen2-MoE's always-on shared expert (0 = none)
    norm_topk_prob: bool = True   # renormalise the top-k gate weights to sum to 1
    capacity_factor: float = 0.0  # 0 = dropless routing; > 0 = capacity routing
    rope: RopeConfig = RopeConfig()
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str = "none"         # none | head (per head, Qwen3) | full (whole projection, OLMoE)
    clip_qkv: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer: window applies (empty = every layer)
    tie_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if len(self.moe_layers) != self.n_layers:
            raise ConfigError(f"moe_layers has {len(self.moe_layers)} entries for {self.n_layers} layers")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.n_heads}) is not a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})")
        if any(self.moe_layers) and not 1 <= self.top_k <= self.n_experts:
            raise ConfigError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    def uses_window(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return not self.sliding_layers or self.sliding_layers[layer]

    def capacity(self, n_tokens: int) -> int:
        """Slots per expert in capacity mode: ceil(capacity_factor * tokens * top_k / n_experts)."""
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts))

    def parameter_counts(self) -> tuple[int, int]:
        """(total, active per token) parameter counts; active counts top_k experts per MoE layer."""
        d, h = self.d_model, self.head_dim
        attn = d * h * (self.n_heads * 2 + self.n_kv_heads * 2)
        attn += (h * (self.n_heads + 2 * self.n_kv_heads) if self.qkv_bias else 0) + (d if self.o_bias else 0)
        attn += {"none": 0, "head": 2 * h, "full": h * (self.n_heads + self.n_kv_heads)}[self.qk_norm]
        expert = 3 * d * self.d_expert
        shared = 3 * d * self.d_shared_expert + (d if self.d_shared_expert else 0)
        total = active = 0
        for is_moe in self.moe_layers:
            base = attn + 2 * d
            if is_moe:
                total += base + d * self.n_experts + self.n_experts * expert + shared
                active += base + d * self.n_experts + self.top_k * expert + shared
            else:
                total += base + 3 * d * self.d_ff
                active += base + 3 * d * self.d_ff
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2) + d
        return total + embed, active + embed

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def read_config_json(checkpoint: str | Path) -> dict:
    """Read `config.json` from a checkpoint folder, with errors a user can act on."""
    path = Path(checkpoint) / "config.json"
    if not Path(checkpoint).is_dir():
        raise ConfigError(f"{checkpoint} is not a folder", "pass a checkpoint directory or a Hub repo id")
    if not path.is_file():
        raise ConfigError(f"no config.json in {checkpoint}",
                          "this folder is not a Hugging Face checkpoint; run `moe download REPO` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err})", "re-download the checkpoint") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object", "re-download the checkpoint")
    return data


def load_config(checkpoint: str | Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint folder (dispatches on `model_type`)."""
    from moecli.families import config_from_hf

    return config_from_hf(read_config_json(checkpoint))
