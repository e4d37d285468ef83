"""Routing capture against transformers' router logits, the routing JSON and views, and ablation."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from checkpoints import chat_checkpoint
from hf_models import build, save
from moecli import load_model
from moecli.cli.main import app
from moecli.inference.routing import token_pieces, token_view
from moecli.text.tokenizer import Tokenizer

FAMILIES = {
    "mixtral": dict(num_local_experts=5, num_experts_per_tok=2),
    "qwen2_moe": dict(num_hidden_layers=3, num_experts=4, moe_intermediate_size=16,
                      shared_expert_intermediate_size=20, mlp_only_layers=[1]),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, norm_topk_prob=False),
}
IDS = [[1, 5, 9, 33, 7, 64, 2, 100, 17, 3]]
BARD = Path(__file__).resolve().parent.parent / "weights" / "bardmoe"  # the bundled model: it writes verse


@pytest.mark.parametrize("family", list(FAMILIES))
def test_routing_matches_transformers_router_logits(family, tmp_path):
    hf = build(family, **FAMILIES[family])
    model = load_model(save(hf, tmp_path), dtype="float32")
    _, routing = model(np.array(IDS), return_routing=True)
    with torch.no_grad():
        router_logits = hf(torch.tensor(IDS), output_router_logits=True).router_logits
    assert routing.experts.shape == (len(router_logits), 1, len(IDS[0]), model.config.top_k)
    for layer, logits in enumerate(router_logits):
        probs = torch.softmax(logits.float(), dim=-1)
        top_w, top_e = torch.topk(probs, model.config.top_k, dim=-1)
        if model.config.norm_topk_prob:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        np.testing.assert_array_equal(np.asarray(routing.experts[layer, 0]), top_e.numpy())
        np.testing.assert_allclose(np.asarray(routing.weights[layer, 0]), top_w.numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory.mktemp("plain"), "plain")


def run(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def test_token_pieces_are_each_tokens_own_text():
    """A newline is the newline token's piece (it used to come out with the next token, "\nNow");
    a character made of byte tokens is the piece of the byte that completes it."""
    tok = Tokenizer.from_dir(BARD)
    ids = tok.encode("To be, or not\nNow is the winter\n\nof our 中 é")
    pieces = token_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False)
    newline = tok.token_to_id("<0x0A>")
    assert [piece for i, piece in zip(ids, pieces) if i == newline] == ["\n"] * 3
    assert pieces[ids.index(newline) + 1] == "Now"
    assert not any("\n" in piece for i, piece in zip(ids, pieces) if i != newline)
    assert "中" in pieces and pieces[pieces.index("中") - 2:pieces.index("中")] == ["", ""]


def test_token_pieces_of_an_invalid_byte_run_still_add_up():
    tok = Tokenizer.from_dir(BARD)
    byte = {value: tok.token_to_id(f"<0x{value:02X}>") for value in (0x0A, 0xE4)}
    for ids in (tok.encode("hello") + [byte[0x0A], byte[0xE4]] + tok.encode("x", add_special_tokens=False),
                tok.encode("hello") + [byte[0x0A], byte[0xE4]]):
        assert "".join(token_pieces(tok, ids)) == tok.decode(ids, skip_special_tokens=False)


def test_routing_json_of_a_verse_reply_has_each_tokens_text_and_no_eos(tmp_path):
    out = tmp_path / "routing.json"
    result = run("generate", "--model", BARD, "--prompt", "To be, or not", "--temperature", 0, "--max-tokens", 60,
                 "--routing-json", out, "--show-routing", "--verbose")
    assert result.exit_code == 0, result.output
    # what makes this test bite: the greedy reply has several lines and ends at </s>, which the decoder fed
    assert "stopped by eos" in result.stderr and result.stdout.strip().count("\n") >= 1, result.output
    tokens = json.loads(out.read_text())["tokens"]
    reply = [t for t in tokens if not t["prompt"]]
    tok = Tokenizer.from_dir(BARD)
    assert not any(t["id"] in tok.eos_ids or t["text"] == "</s>" for t in reply)
    assert "".join(t["text"] for t in reply).strip() == result.stdout.strip()
    newline = tok.token_to_id("<0x0A>")
    assert [t["text"] for t in tokens if t["id"] == newline] == ["\n"] * sum(t["id"] == newline for t in tokens)
    assert not any(t["text"].startswith("\n") for t in tokens if t["id"] != newline)
    # the load table counts what it says: the prompt's and the reply's tokens
    assert f"expert load over {len(tokens)} tokens (prompt + reply)" in " ".join(result.stderr.split())
    assert "</s>" not in result.stderr.split("top expert")[1].split("expert load")[0]


def test_routing_json_covers_every_token_and_matches_full_forward(plain, tmp_path):
    out = tmp_path / "routing.json"
    result = run("generate", "--model", plain, "--prompt", "the water", "--temperature", 0, "--max-tokens", 8,
                 "--routing-json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    tokens = data["tokens"]
    n_prompt = sum(t["prompt"] for t in tokens)
    assert n_prompt >= 2 and len(tokens) - n_prompt == 8
    assert "".join(t["text"] for t in tokens[n_prompt:]).strip() == result.stdout.strip()
    model = load_model(plain, dtype="float32")
    _, routing = model(np.array([[t["id"] for t in tokens]]), return_routing=True)
    for i, token in enumerate(tokens):
        for j, layer in enumerate(token["layers"]):
            assert layer["experts"] == np.asarray(routing.experts[j, 0, i]).tolist()
            np.testing.assert_allclose(layer["weights"], np.asarray(routing.weights[j, 0, i]), atol=1e-5)


def test_show_routing_colours_tokens_with_a_legend_only_when_colour_is_on(plain):
    args = ["generate", "--model", plain, "--prompt", "the water", "--max-tokens", 6, "--show-routing",
            "--routing-layer", 0, "--temperature", 0]
    coloured = run(*args, env={"FORCE_COLOR": "1", "NO_COLOR": None})
    assert coloured.exit_code == 0, coloured.output
    assert "layer 0, top expert per token: " in coloured.stderr and "\x1b[" in coloured.stderr
    assert "max/mean" in coloured.stderr and "expert load over" in coloured.stderr
    for env in ({"FORCE_COLOR": None, "NO_COLOR": None}, {"FORCE_COLOR": "1", "NO_COLOR": "1"}):  # no terminal; NO_COLOR
        plain_text = run(*args, env=env)
        assert plain_text.exit_code == 0, plain_text.output
        assert "top expert per token" not in plain_text.stderr  # no legend of colours that are not there
        assert "layer 0, top expert after each token" in plain_text.stderr and "‹" in plain_text.stderr
        assert "max/mean" in plain_text.stderr
        assert env["NO_COLOR"] or "\x1b[" not in plain_text.stderr


def test_token_view_without_colour_writes_the_expert_after_each_token(plain):
    config = load_model(plain, dtype="float32").config
    routing = [(np.array([[e, 0], [1, 2]]), np.ones((2, 2))) for e in (3, 1, 2)]
    text = token_view(["To", " be", "\n"], routing, config, 0, colour=False).plain
    assert text.endswith("To‹3› be‹1›↵‹2›\n") and "per token:" not in text
    assert token_view(["To", " be", "\x03"], routing, config, 0).plain.startswith("To be\u2403\nlayer 0, top expert per token:")


def test_mask_removes_the_expert_and_changes_the_reply(plain, tmp_path):
    base = ["generate", "--model", plain, "--prompt", "the water", "--temperature", 0, "--max-tokens", 10]
    out = tmp_path / "r.json"
    normal = run(*base, "--routing-json", out)
    used = {t["layers"][1]["experts"][0] for t in json.loads(out.read_text())["tokens"]}
    victim = max(used, key=lambda e: sum(t["layers"][1]["experts"][0] == e
                                         for t in json.loads(out.read_text())["tokens"]))
    masked = run(*base, "--mask", f"1:{victim}", "--routing-json", out)
    assert masked.exit_code == 0, masked.output
    for token in json.loads(out.read_text())["tokens"]:
        assert victim not in token["layers"][1]["experts"]
    assert masked.stdout != normal.stdout


def test_chat_experts_mask_and_unmask(plain):
    script = "hello\n/experts layer 0\n/mask 1:0\nagain\n/experts\n/unmask\n/mask 5:5\n/experts layer x\n"
    result = CliRunner().invoke(app, ["chat", "--model", str(plain), "--max-tokens", 6], input=script)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("max/mean") == 2 and "switched off: 1:0" in result.stdout
    assert " ".join(result.stdout.split()).count(" tokens (reply), % of assignments") == 2  # titles wrap
    assert "all experts back on" in result.stdout
    assert "layer 5 has no experts" in result.stderr and "bad /experts argument" in result.stderr


def test_experts_after_load_says_why_there_is_nothing_to_show(plain, tmp_path):
    """A chat brought in by /load has no routing (its replies were not generated here): /experts
    says so, instead of telling the user of a MoE model to "use a MoE model"."""
    saved = tmp_path / "chat.json"
    saved.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}))
    script = f"hello\n/load {saved}\n/experts\n"
    result = CliRunner().invoke(app, ["chat", "--model", str(plain), "--max-tokens", 4], input=script)
    assert result.exit_code == 0, result.output
    assert "no reply to show the experts of yet" in result.stderr and "/load" in result.stderr
    assert "MoE model" not in result.stderr and "max/mean" not in result.stdout


def test_show_routing_with_sharded_experts_shows_devices(plain):
    """With --devices 4 (8 CPU devices forced): the per-device table of experts, bytes and load."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run([sys.executable, "-m", "moecli", "generate", "--model", str(plain), "--prompt", "the water",
                             "--max-tokens", "6", "--devices", "4", "--show-routing"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "experts over 4 devices" in result.stderr
    for d, experts in enumerate(("0..0", "1..1", "2..2", "3..3")):
        assert f"cpu:{d}" in result.stderr and experts in result.stderr
    shares = [int(line.split()[-1].rstrip("%")) for line in result.stderr.splitlines()
              if line.strip().startswith("cpu:")]
    assert len(shares) == 4 and 98 <= sum(shares) <= 102
