"""Checkpoint families: one small module per architecture family that maps its config.json and
tensor names onto moecli's one model (see `common.py` for the contract)."""
from __future__ import annotations

from types import ModuleType

from moecli.model.config import ModelConfig
from moecli.errors import ConfigError
from moecli.checkpoints.families import mixtral, olmoe, qwen_moe
from moecli.checkpoints.families.common import TensorMap, tensor_map

FAMILIES: dict[str, ModuleType] = {
    "mixtral": mixtral,
    "qwen2_moe": qwen_moe,
    "qwen3_moe": qwen_moe,
    "olmoe": olmoe,
}


def _family(model_type) -> ModuleType:
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type {model_type!r} is not supported",
                          f"supported model types: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a parsed config.json (any supported model_type)."""
    return _family(hf.get("model_type")).config_from_hf(hf)


def checkpoint_tensors(config: ModelConfig) -> TensorMap:
    """Every tensor name the checkpoint may hold, its expected shape and where it goes."""
    return tensor_map(config, _family(config.family).moe_tensors)
