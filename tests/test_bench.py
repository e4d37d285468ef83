"""`moe bench`: both engines run on the same files and the JSON has every metric and the ratios."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from moecli.benchmark import harness as bench
from moecli.cli.main import app

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
    assert data["transformers"]["decode_of_floor"] == pytest.approx(
        data["transformers"]["decode_tok_s"] / data["moecli"]["decode_floor_tok_s"])
    assert f"{data['ratio']['decode']:.2f}x" in result.stdout


def test_bench_rejects_unknown_model():
    result = CliRunner().invoke(app, ["bench", "no-such-shape"])
    assert result.exit_code == 2 and "neither a checkpoint folder nor a known shape" in result.stderr


def test_bench_repeat_alternates_engines_and_reports_medians(tiny_shape, tmp_path, monkeypatch):
    """--repeat N: the engines take turns going first, each metric is the median of its runs and the
    ratio the median of the back-to-back pairs' ratios (not a ratio of medians)."""
    decode = {"moecli": iter([10.0, 30.0, 12.0]), "transformers": iter([5.0, 10.0, 8.0])}
    floors = iter([20.0, 40.0, 16.0])  # the decode floor each moecli run measured
    calls = []

    def fake_run(engine, folder, dtype, prompt_len, new_tokens, timeout):
        calls.append(engine)
        result = {key: 1.0 for key in bench.METRICS}
        result.update(decode_tok_s=next(decode[engine]), prefill_tok_s=2.0, device="cpu", version="v")
        if engine == "moecli":
            result.update(decode_floor_tok_s=next(floors))
        return result

    monkeypatch.setattr(bench, "write_synthetic", lambda shape, dtype: tmp_path)
    monkeypatch.setattr(bench, "run_engine", fake_run)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", tiny_shape, "--compare-hf", "--repeat", "3", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert calls == ["moecli", "transformers", "transformers", "moecli", "moecli", "transformers"]
    data = json.loads(out.read_text())
    assert data["moecli"]["decode_tok_s"] == 12.0 and data["transformers"]["decode_tok_s"] == 8.0
    assert data["ratio_runs"]["decode"] == [2.0, 3.0, 1.5]
    assert data["ratio"]["decode"] == 2.0 and data["ratio"]["prefill"] == 1.0
    assert len(data["runs"]["moecli"]) == 3 and data["setup"]["repeat"] == 3
    assert "2.00x (1.50-3.00)" in result.stdout and "median of 3 runs" in result.stdout
    # transformers' share of the floor its own pair's moecli run measured: 5/20, 10/40, 8/16
    assert [r["decode_of_floor"] for r in data["runs"]["transformers"]] == [0.25, 0.25, 0.5]
    assert data["transformers"]["decode_of_floor"] == 0.25


def test_bench_rejects_zero_repeats(tiny_shape):
    result = CliRunner().invoke(app, ["bench", tiny_shape, "--repeat", "0"])
    assert result.exit_code == 2 and "--repeat must be positive" in result.stderr
