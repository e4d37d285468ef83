"""Writing moecli's parameters as a Hugging Face Mixtral checkpoint (config.json + model.safetensors).

Loading a checkpoint maps Hugging Face tensor names onto Haiku parameters through the family's
table (`moecli.checkpoints.families.checkpoint_tensors`); exporting runs the same table backwards. The table
lists several names for some parameters (experts one tensor each, `...experts.{e}.w1.weight`,
or fused 3-D `...experts.gate_up_proj`; Mixtral's Hub name `block_sparse_moe` or transformers
5's `mlp`). We write the first name that covers each parameter alone: per-expert
`model.layers.{i}.block_sparse_moe.experts.{e}.w1/w2/w3.weight` and
`...block_sparse_moe.gate.weight`, the layout of the Mixtral checkpoints on the Hub, which both
moecli and transformers (which renames and fuses them when it loads) read.

torch's Linear stores weights [out, in] and Haiku's [in, out], so matrices are transposed back.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from moecli.dtypes import FLOATS
from moecli.model.config import ModelConfig
from moecli.errors import UsageError
from moecli.checkpoints.families import checkpoint_tensors

EXPORT_DTYPES = FLOATS


def hf_config(config: ModelConfig, dtype: str = "bfloat16") -> dict:
    """config.json for a `MixtralForCausalLM` with this shape: every field transformers'
    MixtralConfig has, so nothing falls back to the (Mixtral-8x7B) defaults."""
    if config.family != "mixtral" or not all(config.moe_layers) or config.d_shared_expert:
        raise UsageError(f"only Mixtral-shaped models can be exported, not {config.family}",
                         "train with every layer MoE and no shared expert")
    if config.rope.kind != "default" or config.qkv_bias or config.o_bias or config.qk_norm != "none":
        raise UsageError("this model has features the Mixtral architecture lacks",
                         "use default RoPE, no biases and no q/k norm")
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_expert,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": config.norm_eps,
        "use_cache": True,
        "pad_token_id": None,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids[0] if len(config.eos_token_ids) == 1 else list(config.eos_token_ids),
        "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": config.rope.theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope.theta},
        "sliding_window": config.sliding_window,
        "attention_dropout": 0.0,
        "num_experts_per_tok": config.top_k,
        "num_local_experts": config.n_experts,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.01,
        "router_jitter_noise": 0.0,
        "dtype": dtype,
    }


def export_names(config: ModelConfig) -> dict[str, tuple[str, str, int | None, bool]]:
    """{checkpoint tensor name: (module, param, expert, transpose)}: one name per parameter (or per
    expert of a stacked parameter), the first the family's table offers for it."""
    claimed: dict[tuple[str, str], object] = {}  # (module, param) -> "whole" or the set of experts
    names = {}
    for name, spec in checkpoint_tensors(config).items():
        if len(spec.targets) != 1 or spec.targets[0].rows is not None:
            continue  # fused tensors (gate_up_proj) fill two parameters at once
        t = spec.targets[0]
        key = (t.module, t.param)
        if t.expert is None:
            if key in claimed:
                continue
            claimed[key] = "whole"
        else:
            experts = claimed.setdefault(key, set())
            if experts == "whole" or t.expert in experts:
                continue
            experts.add(t.expert)
        names[name] = (t.module, t.param, t.expert, t.transpose)
    return names


def export_tensors(params: dict, config: ModelConfig, dtype: str = "bfloat16") -> dict[str, np.ndarray]:
    """{checkpoint name: array in `dtype`} for every parameter of `params`."""
    if dtype not in EXPORT_DTYPES:
        raise UsageError(f"unknown export dtype {dtype!r}", f"choose one of: {', '.join(EXPORT_DTYPES)}")
    host = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    tensors, used = {}, set()
    for name, (module, param, expert, transpose) in export_names(config).items():
        if module not in host or param not in host[module]:
            continue  # e.g. lm_head when embeddings are tied
        value = host[module][param]
        if expert is not None:
            value = value[expert]
        if transpose:
            value = np.swapaxes(value, -1, -2)
        tensors[name] = np.ascontiguousarray(value.astype(EXPORT_DTYPES[dtype]))
        used.add((module, param))
    unused = [f"{m}/{p}" for m in host for p in host[m] if (m, p) not in used]
    if unused:
        raise UsageError(f"parameter {unused[0]} has no checkpoint name", "the model does not fit the Mixtral layout")
    return tensors


def save_checkpoint(folder: str | Path, params: dict, config: ModelConfig, dtype: str = "bfloat16") -> Path:
    """Write `config.json` and `model.safetensors` (tokenizer files are written separately)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = export_tensors(params, config, dtype)
    (folder / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=2) + "\n", encoding="utf-8")
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.chmod(0o644)
    tmp.replace(folder / "model.safetensors")
    return folder
