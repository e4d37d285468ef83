"""Routing capture against transformers' router logits, the routing JSON and views, and ablation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from checkpoints import chat_checkpoint
from hf_models import build, save
from moecli import load_model
from moecli.cli.main import app

FAMILIES = {
    "mixtral": dict(num_local_experts=5, num_experts_per_tok=2),
    "qwen2_moe": dict(num_hidden_layers=3, num_experts=4, moe_intermediate_size=16,
                      shared_expert_intermediate_size=20, mlp_only_layers=[1]),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16, norm_topk_prob=True),
    "olmoe": dict(num_experts=4, norm_topk_prob=False),
}
IDS = [[1, 5, 9, 33, 7, 64, 2, 100, 17, 3]]


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


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


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


def test_show_routing_prints_token_colours_and_load(plain):
    result = run("generate", "--model", plain, "--prompt", "the water", "--max-tokens", 6, "--show-routing",
                 "--routing-layer", 0)
    assert result.exit_code == 0, result.output
    assert "layer 0, top expert per token" in result.stderr
    assert "max/mean" in result.stderr and "expert load over" in result.stderr


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
    assert "all experts back on" in result.stdout
    assert "layer 5 has no experts" in result.stderr and "bad /experts argument" in result.stderr


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
