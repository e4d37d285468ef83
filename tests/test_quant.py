"""Weights quantized on load (`--quantize q8|q4`, moecli/model/quant.py): the integers and scales
are laid out as the kernels read them, a quantized model computes exactly what a float model of the
dequantized weights computes, it takes ~8.5 or ~4.5 bits per expert weight in memory, and its
experts shard over devices like float ones."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from hf_models import build, save
from moecli import Model, generate_tokens, load_model
from moecli.model.ops import XLA
from moecli.model import quant
from moecli.model.config import QuantConfig
from moecli.model.sizes import weight_bytes

PROMPT = [1, 5, 9, 33, 7, 64, 2, 100, 17, 3, 90, 41]
WORKER = str(Path(__file__).with_name("sharding_worker.py"))


def test_the_q4_byte_layout_is_the_documented_one():
    """Rows 2i and 2i+1 share a byte: low nibble, high nibble, each value + 8; one scale per group."""
    w = np.zeros((4, 2), np.float32)
    w[:, 0] = [7, -7, 1, 0]       # scale 1 for column 0 (group of 4 rows; max |w| = 7)
    w[:, 1] = [0, 14, -14, 2]     # scale 2 for column 1
    q, scale = quant.quantize(w, 4)
    assert q.dtype == np.uint8 and q.shape == (2, 2) and scale.dtype == np.float16 and scale.shape == (1, 2)
    np.testing.assert_array_equal(scale, [[1, 2]])
    assert q[0, 0] == (7 + 8) | ((-7 + 8) << 4) and q[1, 0] == (1 + 8) | ((0 + 8) << 4)
    assert q[0, 1] == (0 + 8) | ((7 + 8) << 4) and q[1, 1] == (-7 + 8) | ((1 + 8) << 4)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(quant.QuantizedWeight(jnp.asarray(q), jnp.asarray(scale)))), w)


@pytest.mark.parametrize("bits,bound", [(8, 0.01), (4, 0.15)])
def test_round_trip_error_is_that_of_the_grid(bits, bound):
    w = np.random.default_rng(bits).standard_normal((3, 96, 40)).astype(np.float32)
    q, scale = quant.quantize(w, bits)
    assert q.shape == ((3, 96, 40) if bits == 8 else (3, 48, 40)) and scale.shape == (3, 3, 40)
    back = np.asarray(quant.dequantize(quant.QuantizedWeight(jnp.asarray(q), jnp.asarray(scale))))
    error = np.abs(back - w)
    # Rounding to nearest: never more than half a step, and on average about a quarter of one.
    step = np.repeat(scale.astype(np.float32), 32, axis=-2)
    assert (error <= step / 2 + 1e-6).all()
    assert np.mean(error) / np.mean(np.abs(w)) < bound


def test_which_parameters_are_quantized():
    q4, q8 = QuantConfig.preset(4), QuantConfig.preset(8)
    assert quant.bits_for("transformer/layer_3/moe/w_down", q4) == 4
    assert quant.bits_for("transformer/layer_0/attn/q_proj/w", q4) == 4
    assert quant.bits_for("transformer/layer_1/moe/shared_expert/up_proj/w", q8) == 8
    assert quant.bits_for("transformer/lm_head", q4) == 8          # the LM head keeps 8 bits under q4
    for kept in ("transformer/layer_0/moe/router", "transformer/embed/embeddings",
                 "transformer/layer_0/input_norm/scale", "transformer/layer_0/attn/q_proj/b",
                 "transformer/layer_0/moe/shared_expert_gate/w"):
        assert quant.bits_for(kept, q4) == 0, kept


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = build("qwen2_moe", num_hidden_layers=3, num_experts=8, moe_intermediate_size=32, intermediate_size=64,
               shared_expert_intermediate_size=32, mlp_only_layers=[1], hidden_size=64)
    return save(hf, tmp_path_factory.mktemp("float"))


def dequantized_copy(folder: Path, out: Path, bits: int) -> Path:
    """The checkpoint with every weight `--quantize q{bits}` covers replaced by its dequantized
    self: a float model that must compute exactly what the quantized one does."""
    import shutil

    from moecli.checkpoints.families import checkpoint_tensors, load_config

    shutil.copytree(folder, out)
    table = checkpoint_tensors(load_config(folder))
    tensors = load_file(out / "model.safetensors")
    for name, tensor in tensors.items():
        target = table[name].targets[0]
        b = quant.bits_for(f"{target.module}/{target.param}", QuantConfig.preset(bits))
        if b and tensor.ndim == 2:  # [out, in] in the file; quantized along "in"
            q, scale = quant.quantize(tensor.T, b)
            tensors[name] = np.ascontiguousarray(np.asarray(quant.dequantize(
                quant.QuantizedWeight(jnp.asarray(q), jnp.asarray(scale)))).T)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("quantize,bits", [("q8", 8), ("q4", 4)])
def test_a_quantized_model_equals_the_float_model_of_its_dequantized_weights(checkpoint, tmp_path, quantize, bits):
    """Both on plain XLA (the reference path: dequantize, then multiply), so the comparison is exact."""
    loaded = load_model(checkpoint, dtype="float32", quantize=quantize)
    model = Model(loaded.config, loaded.params, ops=XLA)
    dequantized = load_model(dequantized_copy(checkpoint, tmp_path / "dq", bits), dtype="float32")
    reference = Model(dequantized.config, dequantized.params, ops=XLA)
    got, want = np.asarray(model([PROMPT])), np.asarray(reference([PROMPT]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert generate_tokens(model, PROMPT, 12) == generate_tokens(reference, PROMPT, 12)   # the cached decode too
    experts = model.params["transformer/layer_0/moe"]
    assert experts["w_gate_q"].dtype == (jnp.int8 if bits == 8 else jnp.uint8)
    assert "w_gate" not in experts and experts["router"].dtype == jnp.float32


@pytest.mark.parametrize("quantize", ["q8", "q4"])
def test_the_cpu_kernels_compute_what_the_reference_computes(checkpoint, quantize):
    """On this machine's backend (the C++ kernels on CPU), float32 to float rounding: one token (the
    decode kernels) and a prompt (the prompt engine, capped at its float32 engine for float32
    activations even where AMX / AVX512-BF16 take bfloat16 ones)."""
    model = load_model(checkpoint, dtype="float32", quantize=quantize)
    assert model.ops.name == "cpu-kernels", model.ops.notes
    reference = Model(model.config, model.params, ops=XLA)
    for tokens in ([[PROMPT[0]], [PROMPT[1]]], [PROMPT]):
        got, want = np.asarray(model(tokens)), np.asarray(reference(tokens))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("quantize,bits_per_weight", [("q8", 8.5), ("q4", 4.5)])
def test_bits_per_expert_weight_in_memory(checkpoint, quantize, bits_per_weight):
    model = load_model(checkpoint, dtype="float32", quantize=quantize)
    experts = model.params["transformer/layer_0/moe"]
    weights = 8 * 3 * 64 * 32
    stored = sum(experts[f"{p}_{part}"].nbytes for p in ("w_gate", "w_up", "w_down") for part in ("q", "scale"))
    assert stored * 8 / weights == pytest.approx(bits_per_weight)   # 4 or 8 bits + a float16 per 32 weights
    replicated, expert_bytes = weight_bytes(model.config, 4)
    assert expert_bytes == 2 * stored                               # two MoE layers; what moe info counts
    assert sum(weight_bytes(model.config.replace(quant=QuantConfig()), 4)) > 3 * (replicated + expert_bytes)


def test_quantized_experts_shard_over_devices(checkpoint, tmp_path):
    out = tmp_path / "quantized.json"
    subprocess.run([sys.executable, WORKER, "quantized", str(checkpoint), str(out)], check=True, timeout=600)
    result = json.loads(out.read_text())
    np.testing.assert_allclose(np.array(result["4"]["logits"]), np.array(result["1"]["logits"]), atol=1e-4, rtol=0)
    assert result["4"]["greedy"] == result["1"]["greedy"]
    assert [s[0] for s in result["4"]["expert_shard_shapes"]] == [2, 2, 2, 2]


def test_an_unknown_quantize_value_is_one_clear_error(checkpoint):
    from moecli.errors import UsageError

    with pytest.raises(UsageError, match="unknown --quantize 'q3'") as err:
        load_model(checkpoint, quantize="q3")
    assert "q8, q4" in err.value.hint
