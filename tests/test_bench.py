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


# --- gpt-oss-20b: MXFP4 experts written as the Hub stores them ----------------------------------------------

def test_gpt_oss_20b_shape_is_the_published_model():
    """The shape is transformers' GptOssConfig(num_hidden_layers=24, num_local_experts=32) (the token ids
    aside), with OpenAI's published 20.9 B parameters (3.6 B active) and 12.8 GiB of stored weights
    (MXFP4 experts), all from traced shapes: no weight is written."""
    import transformers

    from moecli.checkpoints.families import config_from_hf
    from moecli.checkpoints.stored_size import stored_weights
    from moecli.model.sizes import parameter_counts

    hf = bench.shape_config("gpt-oss-20b", "float32")
    assert hf["dtype"] == "bfloat16" and hf["quantization_config"]["quant_method"] == "mxfp4"
    ours = config_from_hf(hf)
    theirs = transformers.GptOssConfig(num_hidden_layers=24, num_local_experts=32).to_dict()
    theirs = config_from_hf({**theirs, "model_type": "gpt_oss", "quantization_config": hf["quantization_config"]})
    assert ours.replace(bos_token_id=theirs.bos_token_id, eos_token_ids=theirs.eos_token_ids) == theirs
    total, active, _ = parameter_counts(ours)
    assert (round(total / 1e9, 1), round(active / 1e9, 1)) == (20.9, 3.6)
    assert round(stored_weights(ours, hf).total / 2**30, 1) == 12.8


def test_decode_floor_counts_mxfp4_experts_at_their_bytes():
    """A token reads its 4 of 32 experts at 4.25 bits a weight and the other active weights at the
    float dtype's size, so the floor is not the float model's."""
    from moecli.checkpoints.families import config_from_hf
    from moecli.model.sizes import parameter_counts

    c = config_from_hf(bench.shape_config("gpt-oss-20b", "float32"))
    chosen = c.n_layers * c.top_k * (c.d_model * 2 * c.d_expert + c.d_expert * c.d_model)  # weights, not biases
    expected = (parameter_counts(c).active - chosen) * 4 + chosen * (1 / 2 + 1 / 32)
    floor = bench.decode_floor(c, 4, 10.0)
    assert floor["active_gb_per_token"] == pytest.approx(expected / 1e9)
    assert floor["decode_floor_tok_s"] == pytest.approx(10.0 / floor["active_gb_per_token"])


TINY_GPT_OSS = dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2, head_dim=16,
                    num_attention_heads=8, num_local_experts=4, layer_types=["sliding_attention", "full_attention"],
                    sliding_window=4, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def test_mxfp4_shape_is_written_as_the_hub_stores_it(monkeypatch, tmp_path):
    """The gpt-oss-20b shape, shrunk: experts stored as uint8 `_blocks` [e, out, in / 32, 16] and `_scales`,
    the rest bfloat16; moecli keeps them packed, its logits are transformers' (which dequantizes them), and
    the random scales give the experts' weights an RMS near 1/sqrt(in)."""
    import torch
    import transformers
    from safetensors import safe_open

    from moecli import load_model

    monkeypatch.setitem(bench.SHAPES, "tiny-gpt-oss", {**bench.SHAPES["gpt-oss-20b"], **TINY_GPT_OSS})
    monkeypatch.setenv("MOECLI_CACHE", str(tmp_path / "cache"))
    folder = bench.write_synthetic("tiny-gpt-oss", "float32", shard_bytes=20_000)
    assert folder.name == "tiny-gpt-oss-bfloat16" and len(list(folder.glob("*.safetensors"))) > 1
    stored = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "np") as f:
            stored.update({name: f.get_slice(name) for name in f.keys()})
    experts = "model.layers.0.mlp.experts."
    assert stored[experts + "gate_up_proj_blocks"].get_shape() == [4, 128, 2, 16]
    assert stored[experts + "down_proj_scales"].get_shape() == [4, 64, 2]
    assert experts + "gate_up_proj" not in stored and stored[experts + "gate_up_proj_bias"].get_dtype() == "BF16"
    assert stored["model.layers.0.self_attn.q_proj.weight"].get_dtype() == "BF16"
    model = load_model(folder, dtype="float32")
    assert model.params["transformer/layer_0/moe"]["w_gate_blocks"].dtype == np.uint8
    ids = np.array([[3, 4, 5, 6, 7, 8, 9, 10]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), theirs, atol=1e-4)
    for w in (hf.model.layers[0].mlp.experts.gate_up_proj, hf.model.layers[1].mlp.experts.down_proj):
        assert 0.5 < float(w.detach().pow(2).mean().sqrt()) * 64 ** 0.5 < 2
