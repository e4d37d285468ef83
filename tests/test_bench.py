"""`moe bench`: both engines run on the same files and the JSON has every metric and the ratios."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from moecli import bench
from moecli.cli import app

TINY = dict(model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=256, hidden_size=64,
            intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=8, num_experts_per_tok=2)


@pytest.fixture()
def tiny_shape(monkeypatch, tmp_path):
    monkeypatch.setitem(bench.SHAPES, "tiny-test", TINY)
    monkeypatch.setenv("MOECLI_CACHE", str(tmp_path / "cache"))
    return "tiny-test"


def test_synthetic_checkpoint_loads_in_both_engines(tiny_shape):
    import torch
    import transformers

    from moecli import load_model

    folder = bench.write_synthetic(tiny_shape, "float32", shard_bytes=100_000)
    assert len(list(folder.glob("*.safetensors"))) > 1
    ids = np.array([[3, 4, 5, 6]])
    ours = np.asarray(load_model(folder, dtype="float32")(ids))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_bench_compare_hf_writes_json(tiny_shape, tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", tiny_shape, "--compare-hf", "--prompt-len", "16", "--new-tokens", "4",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for engine in ("moecli", "transformers"):
        for key in bench.METRICS:
            assert key in data[engine]
        assert data[engine]["decode_tok_s"] > 0 and data[engine]["prefill_tok_s"] > 0
    assert data["ratio"]["decode"] == pytest.approx(data["moecli"]["decode_tok_s"] / data["transformers"]["decode_tok_s"])
    assert data["moecli"]["decode_floor_tok_s"] > 0
    assert f"{data['ratio']['decode']:.2f}x" in result.stdout


def test_bench_rejects_unknown_model():
    result = CliRunner().invoke(app, ["bench", "no-such-shape"])
    assert result.exit_code == 2 and "neither a checkpoint folder nor a known shape" in result.stderr
