"""Qwen3-Next and Qwen3.5-MoE against transformers: the gated delta rule's chunked and recurrent forms
against transformers' torch reference functions; tiny random models (hybrid Gated DeltaNet / gated
attention layers, few heads, a conv kernel other than 4, head_dim != hidden / heads, odd expert counts):
logits, greedy tokens, cached decoding through the recurrent state, prompts over several chunks; rewinding
a cache that cannot be rewound, and a 3-turn chat against recomputing every turn; Qwen3.5's multimodal
checkpoint loaded text-only; parameter counts."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers as T
from transformers.models.qwen3_next.modeling_qwen3_next import (torch_chunk_gated_delta_rule,
                                                                torch_recurrent_gated_delta_rule)

from checkpoints import chat_checkpoint
from hf_models import BASE, build, hf_greedy, hf_logits, redraw, save
from moecli import generate_tokens, load_model
from moecli.checkpoints.families import config_from_hf
from moecli.inference.conversation import ChatSession
from moecli.inference.decoder import Decoder
from moecli.inference.sampling import SamplingParams
from moecli.model.deltanet import chunk_gated_delta_rule, prepare_qk, recurrent_gated_delta_rule
from moecli.model.sizes import parameter_counts
from moecli.text.tokenizer import Tokenizer

LIN, FULL = "linear_attention", "full_attention"
MODELS = {
    # 2 key heads for 4 value heads, kernel 3, head_dim 24 (hidden 32 / 4 heads = 8), 5 experts, a dense layer, biases
    "next": ("qwen3_next", dict(
        num_hidden_layers=4, layer_types=[LIN, FULL, LIN, LIN], head_dim=24, num_experts=5, moe_intermediate_size=16,
        shared_expert_intermediate_size=20, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=6, linear_conv_kernel_dim=3, mlp_only_layers=[2], attention_bias=True)),
    # Qwen3.5's split projections: 1 key head for 3 value heads, kernel 5, 3 experts
    "3.5": ("qwen3_5_moe_text", dict(
        num_hidden_layers=3, layer_types=[LIN, FULL, LIN], head_dim=16, num_experts=3, moe_intermediate_size=16,
        shared_expert_intermediate_size=20, linear_num_key_heads=1, linear_num_value_heads=3, linear_key_head_dim=8,
        linear_value_head_dim=10, linear_conv_kernel_dim=5)),
}
PROMPT = [1, 5, 9, 33, 7, 64, 2, 100, 17, 3, 90, 41]


# ----------------------------------------------------------------------------- the delta rule alone

@pytest.mark.parametrize("length,chunk", [(5, 8), (37, 16), (64, 16), (130, 64)])
def test_delta_rule_forms_match_transformers(length, chunk):
    """Shorter than a chunk, ragged, an exact multiple, several chunks; grouped heads and an initial state."""
    rng = np.random.default_rng(length)
    b, k_heads, v_heads, dk, dv = 2, 2, 4, 8, 6
    q, k = (rng.standard_normal((b, length, k_heads, dk)).astype(np.float32) for _ in range(2))
    v = rng.standard_normal((b, length, v_heads, dv)).astype(np.float32)
    g = (-0.5 * np.abs(rng.standard_normal((b, length, v_heads)))).astype(np.float32)
    beta = (1 / (1 + np.exp(-rng.standard_normal((b, length, v_heads))))).astype(np.float32)
    state = rng.standard_normal((b, v_heads, dk, dv)).astype(np.float32)
    args = [torch.tensor(x) for x in (q, k, v, g, beta)]
    theirs = torch_chunk_gated_delta_rule(*args, chunk_size=chunk, initial_state=torch.tensor(state),
                                          output_final_state=True, use_qk_l2norm_in_kernel=True)
    theirs_rec = torch_recurrent_gated_delta_rule(*args, initial_state=torch.tensor(state), output_final_state=True,
                                                  use_qk_l2norm_in_kernel=True)
    qq, kk = prepare_qk(q, k, v_heads)
    ours = chunk_gated_delta_rule(qq, kk, v, g, beta, state, chunk)
    ours_rec = recurrent_gated_delta_rule(qq, kk, v, g, beta, state)
    for mine, ref in ((ours, theirs), (ours_rec, theirs_rec), (ours, theirs_rec)):
        for a, r in zip(mine, ref):
            np.testing.assert_allclose(np.asarray(a), r.numpy(), atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------- tiny models

def centre_norms(hf):
    """These RMSNorms store scale - 1: `redraw`'s 1 ± 0.2 would make every scale 2 ± 0.2 and the model so
    ill-conditioned that float32 rounding alone moves the logits by 1e-4; 0 ± 0.2 is the scale it means.
    (The DeltaNet's gated norm, `linear_attn.norm`, stores its scale as it is.)"""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") and "linear_attn" not in name:
                p.sub_(1)
    return hf


@pytest.fixture(scope="module", params=list(MODELS))
def pair(request, tmp_path_factory):
    model_type, overrides = MODELS[request.param]
    hf = centre_norms(build(model_type, **overrides))
    return hf, load_model(save(hf, tmp_path_factory.mktemp(request.param)), dtype="float32")


def test_logits_match_transformers(pair):
    hf, model = pair
    ids = np.array([PROMPT, PROMPT[::-1]])
    np.testing.assert_allclose(np.asarray(model(ids)), hf_logits(hf, ids).numpy(), atol=1e-4, rtol=0)


def test_a_prompt_over_several_chunks_matches_transformers(pair):
    """Chunks of 64: 64 + 64 + 22, against transformers in float64 (its float32 forward is itself ~3e-5 off)."""
    hf, model = pair
    ids = np.random.default_rng(1).integers(3, BASE["vocab_size"], (1, 150))
    exact = copy.deepcopy(hf).double()
    with torch.no_grad():
        theirs = exact(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), theirs, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(pair):
    hf, model = pair
    assert generate_tokens(model, PROMPT[:7], max_new_tokens=16, temperature=0.0) == hf_greedy(hf, PROMPT[:7], 16)


def test_incremental_decoding_equals_full_forward(pair):
    """A prefill, a chunk continuing from the state (conv window and recurrent state), then single tokens."""
    _, model = pair
    ids = np.array([PROMPT])
    full = np.asarray(model(ids))
    cache = model.init_cache(batch=1, max_len=32)
    steps = []
    for start, end in [(0, 5), (5, 9)] + [(t, t + 1) for t in range(9, len(PROMPT))]:
        logits, cache = model.step(ids[:, start:end], cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=0)
    assert int(cache.pos) == len(PROMPT)


def test_rewinding_a_recurrent_state_equals_never_going_past(pair):
    """Decoder.rewind on a cache that cannot be rewound: back to a snapshot (each prefill's end) and forward
    again, or from the start when no snapshot is early enough; a padded prefill (length bucket 16) after it."""
    _, model = pair
    ids = list(np.random.default_rng(2).integers(3, BASE["vocab_size"], 20))
    fresh = Decoder(model, max_len=64)
    expected = np.asarray(fresh.feed(ids))
    for back in (10, 6):  # after the snapshot at 8, then before it
        decoder = Decoder(model, max_len=64)
        decoder.feed(ids[:8])
        decoder.feed(ids[8:12] + [7, 7, 7])  # tokens to be forgotten
        decoder.rewind(back)
        assert decoder.pos == back and decoder.ids == ids[:back]
        np.testing.assert_allclose(np.asarray(decoder.feed(ids[back:])), expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- chat across turns

def test_three_turn_chat_equals_recomputing_every_turn(tmp_path):
    folder = chat_checkpoint(tmp_path, "chatml", model_type="qwen3_next", **MODELS["next"][1])
    model, tok = load_model(folder, dtype="float32"), Tokenizer.from_dir(folder)
    greedy = SamplingParams(temperature=0.0)
    chat = ChatSession(model, tok, greedy, max_tokens=6, notify=lambda _: None)
    turns = ["hello there", "and then?", "tell me more"]
    replies = []
    for i, text in enumerate(turns):
        replies.append("".join(chat.reply(text)))
        if i:
            assert chat.last_stats.reused_tokens > 10  # the earlier turns were not prefilled again
    for i, text in enumerate(turns):
        fresh = ChatSession(model, tok, greedy, max_tokens=6, notify=lambda _: None)
        fresh.messages = [m for u, r in zip(turns[:i], replies) for m in
                          ({"role": "user", "content": u}, {"role": "assistant", "content": r})]
        assert "".join(fresh.reply(text)) == replies[i]


# ----------------------------------------------------------------------------- Qwen3.5's multimodal checkpoint

def test_multimodal_qwen3_5_loads_its_text_model(tmp_path):
    text = {**{k: v for k, v in BASE.items() if k != "intermediate_size"}, **MODELS["3.5"][1]}
    cfg = T.Qwen3_5MoeConfig(text_config=text, vision_config=dict(depth=1, hidden_size=16, num_heads=2,
                                                                  intermediate_size=32, out_hidden_size=32))
    torch.manual_seed(0)
    hf = T.Qwen3_5MoeForConditionalGeneration._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    redraw(hf, 0)
    centre_norms(hf)
    model = load_model(save(hf.eval(), tmp_path), dtype="float32")
    assert any("model.visual.*" in note and "text model" in note for note in model.load_notes)
    ids = np.array([PROMPT])
    np.testing.assert_allclose(np.asarray(model(ids)), hf_logits(hf, ids).numpy(), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_counts_are_transformers(name):
    model_type, overrides = MODELS[name]
    cfg = T.AutoConfig.for_model(model_type, **{**BASE, **overrides})
    with torch.device("meta"):
        theirs = sum(p.numel() for p in T.AutoModelForCausalLM.from_config(cfg).parameters())
    assert parameter_counts(config_from_hf(cfg.to_dict())).total == theirs


def test_qwen3_next_80b_a3b_counts_79_7_billion():
    counts = parameter_counts(config_from_hf(T.Qwen3NextConfig().to_dict()))
    assert counts.total == pytest.approx(79.7e9, rel=1e-3)


def test_experts_split_over_devices(tmp_path):
    """Qwen3-Next (Gated DeltaNet and gated attention layers, a shared expert, a dense layer) with 4
    experts over 2 and 4 CPU devices (tests/sharding_worker.py) gives one device's logits and greedy
    tokens, and one device gives transformers' logits."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    model_type, overrides = MODELS["next"]
    hf = centre_norms(build(model_type, **{**overrides, "num_experts": 4}))
    folder = save(hf, tmp_path / "next")
    out = tmp_path / "devices.json"
    worker = str(Path(__file__).with_name("sharding_worker.py"))
    subprocess.run([sys.executable, worker, "devices", str(folder), str(out), "1,2,4"], check=True, timeout=600)
    result = json.loads(out.read_text())
    ids = [[1, 5, 9, 33, 7, 64, 2, 100, 17, 3], [4, 8, 15, 16, 23, 42, 99, 7, 1, 2]]  # the worker's
    base = np.array(result["1"]["logits"])
    np.testing.assert_allclose(base, hf_logits(hf, ids).numpy(), atol=1e-4, rtol=0)
    for n in ("2", "4"):
        np.testing.assert_allclose(np.array(result[n]["logits"]), base, atol=1e-5, rtol=0)
        assert result[n]["greedy"] == result["1"]["greedy"]
        assert result[n]["devices_used"] == int(n)
        assert [s[0] for s in result[n]["expert_shard_shapes"]] == [4 // int(n)] * int(n)
