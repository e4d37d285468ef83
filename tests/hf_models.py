"""Tiny random Hugging Face transformers models: the oracle for moecli's parity tests.

Each is built in float32 with eager attention and eager experts, its weights redrawn large enough
that routing is decisive (transformers' 0.02 init leaves the router's top-k near ties, where
float rounding alone can flip an expert), then saved with `save_pretrained`.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import transformers

CONFIGS = {
    "qwen3_next": transformers.Qwen3NextConfig,          # Gated DeltaNet + gated attention (test_qwen3_next.py)
    "qwen3_5_moe_text": transformers.Qwen3_5MoeTextConfig,
    "mixtral": transformers.MixtralConfig,
    "qwen2_moe": transformers.Qwen2MoeConfig,
    "qwen3_moe": transformers.Qwen3MoeConfig,
    "olmoe": transformers.OlmoeConfig,
    "glm4_moe": transformers.Glm4MoeConfig,
    "minimax_m2": transformers.MiniMaxM2Config,
    "gpt_oss": transformers.GptOssConfig,
    "deepseek_v2": transformers.DeepseekV2Config,        # latent attention: pass num_key_value_heads =
    "deepseek_v3": transformers.DeepseekV3Config,        # num_attention_heads (transformers repeats the
    "glm4_moe_lite": transformers.Glm4MoeLiteConfig,     # expanded heads by their ratio)
    "ernie4_5_moe": transformers.Ernie4_5_MoeConfig,
    "phimoe": transformers.PhimoeConfig,
    "granitemoe": transformers.GraniteMoeConfig,               # head_dim: an extra kwarg it keeps
    "granitemoeshared": transformers.GraniteMoeSharedConfig,
    "llama4_text": transformers.Llama4TextConfig,         # Llama4ForCausalLM (tests/test_llama4.py)
    "dots1": transformers.Dots1Config,                    # tests/test_dots1.py
    "hunyuan_v1_moe": transformers.HunYuanMoEV1Config,    # tests/test_hunyuan.py
}

BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build(model_type: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny float32 model of `model_type`, its weights redrawn with `redraw`."""
    cfg = CONFIGS[model_type](**{**BASE, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
    redraw(model, seed)
    return model.eval()


def redraw(model: torch.nn.Module, seed: int) -> None:
    """Weights ~ N(0, 1/fan_in) (unit-scale activations), routers 4x that (decisive top-k),
    norms 1 ± 0.2, biases ± 0.2, embeddings N(0, 1); the routers' selection bias (a buffer,
    `e_score_correction_bias`: GLM-4.5, MiniMax-M2, DeepSeek-V3) ± 0.5, enough to change choices;
    gpt-oss's attention sinks N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                std = 1 / math.sqrt(p.shape[-1])
                if (name.endswith(("gate.weight", "gate.wg.weight")) and "proj" not in name) or name.endswith("router.weight"):
                    std *= 4  # router (Hunyuan's: gate.wg), and the shared-expert gate
                if name.endswith("self_attn.sinks"):
                    std = 1.0  # gpt-oss's attention sinks: logits as large as the scores'
                p.copy_(std * torch.randn(p.shape, generator=gen))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.5 * torch.randn(b.shape, generator=gen))


def save(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


def hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.float()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


# ----------------------------------------------------------------------------- the parity checks

#: The prompt every parity test feeds both models (ids below the tiny vocabularies' 128).
PROMPT = [1, 5, 9, 33, 7, 64, 2, 100, 17, 3, 90, 41]


def assert_logits_match(hf, model, ids=None, atol: float = 1e-4) -> None:
    """moecli's full-forward logits equal transformers' (float32, a batch of two prompts by default)."""
    import numpy as np

    ids = np.array([PROMPT, PROMPT[::-1]]) if ids is None else np.asarray(ids)
    ours, theirs = np.asarray(model(ids)), hf_logits(hf, ids).numpy()
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=atol, rtol=0)


def assert_greedy_matches(hf, model, n: int = 16) -> None:
    """`n` greedy tokens after a 7-token prompt equal transformers' `generate`."""
    from moecli import generate_tokens

    assert generate_tokens(model, PROMPT[:7], max_new_tokens=n, temperature=0.0) == hf_greedy(hf, PROMPT[:7], n)


def assert_cached_decoding_equals_full(model, chunks=((0, 5),), ids=None, atol: float = 1e-4) -> None:
    """Decoding through the cache — the given (start, stop) chunks (default: a 5-token prefill), then
    one token at a time — gives the full forward's logits at every position."""
    import numpy as np

    ids = np.array([PROMPT]) if ids is None else np.asarray(ids)
    full = np.asarray(model(ids))
    cache = model.init_cache(batch=1, max_len=ids.shape[1] + 20)
    spans = list(chunks) + [(t, t + 1) for t in range(chunks[-1][1], ids.shape[1])]
    steps = []
    for start, stop in spans:
        logits, cache = model.step(ids[:, start:stop], cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=atol, rtol=0)
    assert int(cache.pos) == ids.shape[1]
