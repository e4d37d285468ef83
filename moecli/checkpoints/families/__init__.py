"""Checkpoint families: one small module per architecture family that maps its config.json and
tensor names onto moecli's one model (see `common.py` for the contract), and reading a
checkpoint's config.json into a `ModelConfig`."""
from __future__ import annotations

import json
from pathlib import Path

from types import ModuleType

from moecli.model.attention import ATTENTION
from moecli.model.config import ModelConfig, QuantConfig
from moecli.model.experts import GLUS
from moecli.model.norms import NORMS
from moecli.model.router import ROUTERS
from moecli.errors import ConfigError, first_line
from moecli.checkpoints.families import glm4_moe, minimax_m2, mixtral, olmoe, qwen_moe
from moecli.checkpoints.families import gpt_oss
from moecli.checkpoints.families import deepseek
from moecli.checkpoints.families import ernie
from moecli.checkpoints.families import phimoe
from moecli.checkpoints.families import granite
from moecli.checkpoints.families import llama4
from moecli.checkpoints.families import qwen3_next
from moecli.checkpoints.families import dots1
from moecli.checkpoints.families import hunyuan
from moecli.checkpoints.families.common import TensorMap, gqa_tensors, tensor_map

FAMILIES: dict[str, ModuleType] = {
    "mixtral": mixtral,
    "qwen2_moe": qwen_moe,
    "qwen3_moe": qwen_moe,
    "olmoe": olmoe,
    "glm4_moe": glm4_moe,
    "minimax_m2": minimax_m2,
    "gpt_oss": gpt_oss,
    "deepseek_v2": deepseek,
    "deepseek_v3": deepseek,
    "kimi_k2": deepseek,        # Kimi-K2: DeepSeek-V3's architecture under its own model_type
    "glm4_moe_lite": deepseek,  # GLM-4.7-Flash: latent attention and DeepSeek-V3's MoE
    "ernie4_5_moe": ernie,
    "phimoe": phimoe,
    "granitemoe": granite,
    "granitemoeshared": granite,  # Granite MoE with a shared expert
    "llama4_text": llama4,
    "llama4": llama4,           # the multimodal checkpoint: its text model only
    "qwen3_next": qwen3_next,
    "qwen3_5_moe": qwen3_next,       # Qwen3.5's multimodal checkpoint: its text model only
    "qwen3_5_moe_text": qwen3_next,
    "hunyuan_v1_moe": hunyuan,  # Hunyuan-A13B
    "dots1": dots1,             # dots.llm1: DeepSeek-V3's MoE on Qwen3's attention
}


def _family(model_type) -> ModuleType:
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type {model_type!r} is not supported",
                          f"supported model types: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def config_from_hf(hf: dict, folder: str | Path | None = None) -> ModelConfig:
    """ModelConfig from a parsed config.json (any supported model_type); a quantized checkpoint's
    config (and, given its `folder`, its tensors) says which weights it stores as integers
    (`moecli.checkpoints.quantized`)."""
    from moecli.checkpoints import compressed_tensors, fp8, mxfp4
    from moecli.checkpoints.quantized import quant_config_for

    config = _family(hf.get("model_type")).config_from_hf(hf)
    scheme = compressed_tensors.parse_config(hf)
    if scheme is not None:
        config = config.replace(quant=quant_config_for(config, checkpoint_tensors(config), scheme, folder))
    if mxfp4.parse_config(hf):  # the experts stay MXFP4 (moecli.checkpoints.mxfp4)
        config = config.replace(quant=QuantConfig(experts=4, experts_format="mxfp4"))
    block_fp8 = fp8.parse_config(hf)
    if block_fp8 is not None and fp8.keeps_experts_packed(config, block_fp8, folder):  # FP8 experts stay packed
        config = config.replace(quant=QuantConfig(experts=8, experts_format="fp8", block=block_fp8.block))
    for kind, registry in (("attention", ATTENTION), ("router", ROUTERS), ("norm", NORMS), ("expert_act", GLUS)):
        if getattr(config, kind) not in registry:  # a family naming a part that does not exist
            raise ConfigError(f"{config.family} asks for {kind} {getattr(config, kind)!r}, which moecli lacks",
                              f"known: {', '.join(registry)}")
    if any(kind not in ATTENTION for kind in config.layer_attention):  # layers mixing kinds (Qwen3-Next)
        raise ConfigError(f"{config.family} asks for attention kinds {sorted(set(config.layer_attention))}",
                          f"known: {', '.join(ATTENTION)}")
    return config


def checkpoint_tensors(config: ModelConfig) -> TensorMap:
    """Every tensor name the checkpoint may hold, its expected shape and where it goes."""
    family = _family(config.family)
    table = tensor_map(config, family.moe_tensors, getattr(family, "attention_tensors", gqa_tensors))
    rename = getattr(family, "tensor_names", None)  # optional: the family's own names for the shared tensors
    return rename(config, table) if rename else table


def ignored_tensors(config: ModelConfig, hf: dict) -> tuple[str, ...]:
    """Prefixes of checkpoint tensor names the family declares it does not load (`common.py`'s
    optional `ignored_tensors`, e.g. multi-token-prediction layers); () for most families."""
    declared = getattr(_family(config.family), "ignored_tensors", None)
    return declared(hf) if declared else ()


def ignored_reason(config: ModelConfig) -> str:
    """Why the family's `ignored_tensors` are not loaded, in words (its optional `IGNORED_REASON`)."""
    return getattr(_family(config.family), "IGNORED_REASON",
                   "as multi-token-prediction layers for speculative decoding, which moecli does not do")


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
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror or err}", "check the file's permissions") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, too many digits, nesting
        reason = first_line(err, 120)
        raise ConfigError(f"{path} is not valid JSON ({reason})", "re-download the checkpoint") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object", "re-download the checkpoint")
    return data


def load_config(checkpoint: str | Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint folder (dispatches on `model_type`)."""
    data = read_config_json(checkpoint)
    if not isinstance(data.get("model_type"), str):
        raise ConfigError(f"config.json in {checkpoint} names no model_type",
                          f"moecli runs transformers checkpoints of these types: {', '.join(FAMILIES)}")
    return config_from_hf(data, checkpoint)
