"""`moe quantize` and compressed-tensors checkpoints round-tripped, with transformers and the
compressed-tensors library as the oracle (float32 throughout, tiny Mixtral and Qwen2-MoE models):
what moecli writes loads in transformers and computes moecli's logits on that same checkpoint;
what the library writes loads in moecli and computes transformers' logits (or the library's own
decompressed model's); the command itself, its bad inputs; and a loaded checkpoint keeps its
integers (no float copy of the experts, nothing quantized again).

How transformers 5 loads an MoE compressed-tensors checkpoint: its experts are fused 3-D parameters
(`mlp.experts.gate_up_proj` [experts, 2 * ff, d], `down_proj`), not Linear modules, so the library
cannot target them in memory. Loading, transformers runs `CompressedTensorsDequantize` on the
per-expert `weight_packed`/`weight_scale` tensors before merging the experts, so quantized
per-expert Linears load — dequantized in the dtype of the stored scales (float16 scales gave a
float32 model float16 experts). Float per-expert tensors in such a checkpoint it drops: a float
`w2` among quantized `w1`/`w3` is reported MISSING and randomly initialised, and all-float experts
(what the library writes for transformers' own fused model) fail with "Concatenate ... Ckpt
contains: 0". So the library's own flow is tested twice: on the checkpoint's Linears as modules
(llm-compressor's way with MoE experts: one Linear per expert projection), which transformers
loads; and on transformers' fused model, whose float experts only moecli loads.
"""
from __future__ import annotations

import json
import re
import shutil
from functools import partial
from typing import NamedTuple

import numpy as np
import pytest
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                             apply_quantization_config)
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.numpy import load_file
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from checkpoints import chat_checkpoint
from fakehub import FakeHub
from hf_models import build, hf_greedy, hf_logits, save
from moecli import load_model
from moecli.checkpoints import compressed_tensors as ct
from moecli.checkpoints.quantize import quantize_checkpoint
from moecli.cli.main import app
from moecli.model import quant
from moecli.text.chat_template import encode_chat
from moecli.text.tokenizer import Tokenizer

# Every Linear's input size a multiple of 32 (two groups a row); Qwen2-MoE adds the shared expert,
# its gate and attention biases.
FAMILIES = {
    "mixtral": dict(hidden_size=64, intermediate_size=64, num_local_experts=4),
    "qwen2_moe": dict(hidden_size=64, num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=64),
}
#: Each family's checkpoint name of layer 0's expert 1 down projection (`mlp.experts.down_proj[1]` in transformers).
DOWN = {"mixtral": "model.layers.0.block_sparse_moe.experts.1.w2", "qwen2_moe": "model.layers.0.mlp.experts.1.down_proj"}
PROMPT = np.array([[1, 5, 9, 33, 7, 64, 2, 100, 17, 3, 90, 41]])
TOLERANCE = 1e-4  # max |diff| / max |logit|


def relative_error(ours, theirs) -> float:
    return float(np.abs(np.asarray(ours) - np.asarray(theirs)).max() / np.abs(np.asarray(theirs)).max())


def transformers_load(folder):
    """transformers' float32 model of a checkpoint, every weight loaded (none missing, none left over)."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    return model.eval()


class Loaded(NamedTuple):
    model: object             # moecli's model of the checkpoint
    quantize_calls: list      # shapes moecli.model.quant.quantize was called with while loading it


def moecli_load(folder) -> Loaded:
    """load_model(folder), noting each call of moecli's own quantize while it loads: a weight it
    quantizes (again) instead of taking the checkpoint's integers. (Its dequantize runs while
    loading too, traced into the forward pass, which dequantizes inside the program.)"""
    calls = []
    real = quant.quantize
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quant, "quantize", lambda w, *a, **k: calls.append(w.shape) or real(w, *a, **k))
        model = load_model(folder, dtype="float32")
    return Loaded(model, calls)


@pytest.fixture(scope="module", params=list(FAMILIES))
def source(request, tmp_path_factory):
    """(family, the float transformers model, its checkpoint folder)."""
    hf = build(request.param, **FAMILIES[request.param])
    return request.param, hf, save(hf, tmp_path_factory.mktemp(f"{request.param}-float"))


class Written(NamedTuple):
    family: str
    float_model: object
    dst: object
    bits: int
    loaded: Loaded


@pytest.fixture(scope="module", params=[4, 8], ids=["w4a16", "w8a16"])
def written(request, source, tmp_path_factory):
    """A checkpoint `quantize_checkpoint` wrote from `source`, and moecli's load of it."""
    family, hf, src = source
    dst = quantize_checkpoint(src, tmp_path_factory.mktemp(f"{family}-w{request.param}") / "dst", request.param)
    return Written(family, hf, dst, request.param, moecli_load(dst))


def test_what_moe_quantize_writes_loads_in_transformers_with_moeclis_logits(written):
    theirs = transformers_load(written.dst)
    experts = {n: p for n, p in theirs.named_parameters() if ".experts." in n}
    assert experts and all(p.dtype == torch.float32 for p in experts.values()), {n: p.dtype for n, p in experts.items()}
    # transformers' fused expert holds exactly the dequantized integers of the file
    stored = load_file(written.dst / "model.safetensors")
    scheme = ct.parse_config(json.loads((written.dst / "config.json").read_text()))
    expected = ct.dequantize(*ct.decode(stored, DOWN[written.family], scheme))
    np.testing.assert_array_equal(theirs.model.layers[0].mlp.experts.down_proj[1].detach().numpy(), expected)

    logits = hf_logits(theirs, PROMPT).numpy()
    assert relative_error(written.loaded.model(PROMPT), logits) <= TOLERANCE
    # the checkpoint is quantized: the float model's logits are far from both
    assert relative_error(hf_logits(written.float_model, PROMPT).numpy(), logits) > 10 * TOLERANCE


def test_what_moe_quantize_writes(written):
    """The W{bits}A16 scheme in groups of 32; experts and dense layers quantized, the LM head too at
    8 bits; the routers (and Qwen2-MoE's shared-expert gate) float and named in `ignore`."""
    config = json.loads((written.dst / "config.json").read_text())
    scheme = ct.parse_config(config)
    assert (scheme.bits, scheme.group_size, scheme.symmetric, scheme.format) == (written.bits, 32, True, ct.PACKED)
    stored = load_file(written.dst / "model.safetensors")
    floats = {n.removesuffix(".weight") for n, t in stored.items() if n.endswith(".weight") and t.ndim == 2}
    assert floats - {"model.embed_tokens"} == set(scheme.ignore)
    assert all(re.search(r"(\.gate|shared_expert_gate|lm_head)$", n) for n in scheme.ignore), scheme.ignore
    assert ("lm_head" in scheme.ignore) == (written.bits == 4)
    assert f"{DOWN[written.family]}.weight_packed" in stored
    assert all(t.dtype == np.float32 for n, t in stored.items() if n.endswith("weight_scale"))


def test_loading_keeps_the_checkpoints_integers(written):
    """moecli places the file's integers and scales as they are: int8 (q8) or two 4-bit values a byte
    (q4) with float16 scales, nothing quantized again and no float copy of the experts."""
    loaded = written.loaded
    assert loaded.quantize_calls == []
    moe = loaded.model.params["transformer/layer_0/moe"]
    for param in ("w_gate", "w_up", "w_down"):
        assert param not in moe
        assert moe[f"{param}_q"].dtype == (np.int8 if written.bits == 8 else np.uint8)
        assert moe[f"{param}_scale"].dtype == np.float16
    scheme = ct.parse_config(json.loads((written.dst / "config.json").read_text()))
    values, scales, _ = ct.decode(load_file(written.dst / "model.safetensors"), DOWN[written.family], scheme)
    np.testing.assert_array_equal(np.asarray(moe["w_down_q"][1]), quant.pack(values.T, written.bits))
    np.testing.assert_array_equal(np.asarray(moe["w_down_scale"][1]), scales.T)  # float16 values, held exactly


# --- checkpoints the compressed-tensors library writes -------------------------------------------------

IGNORE = ["lm_head", r"re:.*\.gate$", "re:.*shared_expert_gate$"]  # the LM head and the routers, as llm-compressor


def library_compress(model: torch.nn.Module, bits: int):
    """llm-compressor's flow on `model`: the W{bits}A16 scheme on every Linear but IGNORE, min-max
    calibration, then compression; returns the ModelCompressor (for `update_config`). The observer
    rounds each scale to a float16 value (stored in the model's float32): moecli keeps float16
    scales, and an unrounded float32 scale would differ from its float16 copy by up to 2**-11."""
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=32)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=IGNORE))
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w = module.weight.data
            grouped = w.unflatten(-1, (w.shape[1] // 32, 32))
            scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), weights)
            module.weight_scale.data.copy_(scale.half().float())
            module.weight_zero_point.data.copy_(zero_point)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=ct.PACKED)
    compressor.compress_model(model)
    return compressor


def linear_modules(tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A checkpoint's tensors as a module tree under their own names: each 2-D `X.weight` (but the
    embedding) an nn.Linear X, every other tensor a parameter of the module its name leads to."""
    root = torch.nn.Module()

    def module(path: str, make=torch.nn.Module) -> torch.nn.Module:
        node = root
        for i, part in enumerate(parts := path.split(".")):
            if not hasattr(node, part):
                node.add_module(part, make() if i == len(parts) - 1 else torch.nn.Module())
            node = getattr(node, part)
        return node

    linears = {n: t for n, t in tensors.items() if n.endswith(".weight") and t.ndim == 2 and "embed" not in n}
    for name, t in {**linears, **tensors}.items():  # the Linears first: their biases go onto them
        path, _, leaf = name.rpartition(".")
        make = partial(torch.nn.Linear, t.shape[1], t.shape[0], bias=False) if name in linears else torch.nn.Module
        module(path, make).register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=False))
    return root


@pytest.fixture(scope="module")
def library_linears(source, tmp_path_factory):
    """The library's W4A16 checkpoint of `source`, every expert projection a quantized Linear."""
    family, _, src = source
    dst = tmp_path_factory.mktemp(f"{family}-library-linears")
    tree = linear_modules({n: torch.from_numpy(t.copy()) for n, t in load_file(src / "model.safetensors").items()})
    compressor = library_compress(tree, 4)
    save_file({n: t.contiguous() for n, t in tree.state_dict().items()}, dst / "model.safetensors",
              metadata={"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")
    compressor.update_config(dst)
    return family, dst


def test_moecli_reads_the_librarys_per_expert_checkpoint_with_transformers_logits(library_linears):
    family, dst = library_linears
    stored = load_file(dst / "model.safetensors")
    assert f"{DOWN[family]}.weight_packed" in stored and "lm_head.weight" in stored
    loaded = moecli_load(dst)
    assert loaded.quantize_calls == [] and loaded.model.config.quant.experts == 4
    assert relative_error(loaded.model(PROMPT), hf_logits(transformers_load(dst), PROMPT).numpy()) <= TOLERANCE


def test_moecli_reads_the_librarys_checkpoint_of_a_fused_moe_model(tmp_path):
    """The library on transformers' own model quantizes its Linear modules (attention, shared expert)
    and leaves the fused experts float. transformers cannot load that back (see the module doc);
    moecli computes what the library's decompressed model computes, its experts float as stored."""
    hf = build("qwen2_moe", **FAMILIES["qwen2_moe"])
    compressor = library_compress(hf, 4)
    hf.save_pretrained(tmp_path)
    compressor.update_config(tmp_path)
    compressor.decompress_model(hf)         # the library's dequantized weights: the reference
    stored = load_file(tmp_path / "model.safetensors")
    assert f"{DOWN['qwen2_moe']}.weight" in stored and "model.layers.0.self_attn.q_proj.weight_packed" in stored
    loaded = moecli_load(tmp_path)
    assert loaded.quantize_calls == [] and loaded.model.config.quant.experts == 0
    assert relative_error(loaded.model(PROMPT), hf_logits(hf, PROMPT).numpy()) <= TOLERANCE


def test_a_linear_the_group_does_not_divide_stays_float(tmp_path):
    """An expert size of 16 (< 32): the down projections stay float, named in `ignore`, and moecli
    loads the checkpoint (a group of 16 would contradict the config's group_size of 32)."""
    src = save(build("mixtral", num_local_experts=4, intermediate_size=16), tmp_path / "src")
    dst = quantize_checkpoint(src, tmp_path / "dst", 4)
    scheme = ct.parse_config(json.loads((dst / "config.json").read_text()))
    assert "model.layers.1.block_sparse_moe.experts.3.w2" in scheme.ignore
    assert "model.layers.1.block_sparse_moe.experts.3.w1.weight_packed" in load_file(dst / "model.safetensors")
    assert load_model(dst, dtype="float32").config.quant.experts == 4


def test_a_bfloat16_checkpoint_is_quantized_in_bfloat16(tmp_path):
    """bfloat16 weights are quantized as the library quantizes a bfloat16 model (in bfloat16, scales
    stored in bfloat16), and moecli's float16 scales hold those exactly."""
    src = save(build("mixtral", **FAMILIES["mixtral"]).to(torch.bfloat16), tmp_path / "src")
    dst = quantize_checkpoint(src, tmp_path / "dst", 4)
    weights, stored = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
    scheme = ct.parse_config(json.loads((dst / "config.json").read_text()))
    values, scales, _ = ct.quantize(weights[f"{DOWN['mixtral']}.weight"], 4, 32)
    expected = ct.encode(values, scales, None, ct.Scheme(4, 32, scale_dtype="bfloat16"))
    for suffix, tensor in expected.items():
        assert stored[f"{DOWN['mixtral']}.{suffix}"].tobytes() == tensor.tobytes(), suffix
    loaded = moecli_load(dst)
    assert loaded.quantize_calls == []
    moe = loaded.model.params["transformer/layer_0/moe"]
    np.testing.assert_array_equal(np.asarray(moe["w_down_scale"][1]).astype(np.float32),
                                  ct.decode(stored, DOWN["mixtral"], scheme)[1].T)


# --- the command ------------------------------------------------------------------------------------------

runner = CliRunner()


def moe(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def chat_src(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory.mktemp("chat"), "chatml", intermediate_size=64)


def test_moe_quantize_then_generate(chat_src, tmp_path):
    dst = tmp_path / "w4"
    result = moe("quantize", chat_src, "--out", dst, "--bits", 4)
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert "\n" not in line and line.startswith("W4A16 (int4, symmetric, groups of 32): ") and str(dst) in line
    before, after = re.search(r": ([\d.]+ \w+) -> ([\d.]+ \w+);", line).groups()
    assert before != after
    ignore = ct.parse_config(json.loads((dst / "config.json").read_text())).ignore
    assert f"; {len(ignore)} Linear layers kept in float (the ignore list); saved in {dst}" in line
    assert (dst / "tokenizer.json").is_file()

    result = moe("generate", "--model", dst, "--prompt", "the water", "--max-tokens", 4, "--temperature", 0)
    assert result.exit_code == 0, result.output
    tokenizer = Tokenizer.from_dir(dst)
    ids = encode_chat(tokenizer, [{"role": "user", "content": "the water"}])
    expected = hf_greedy(transformers_load(dst), ids, 4)
    expected = expected[:next((i for i, t in enumerate(expected) if t in tokenizer.eos_ids), len(expected))]
    assert result.stdout == tokenizer.decode(expected) + "\n"


@pytest.mark.parametrize("case", ["bits", "quantized", "out"])
def test_bad_input_is_one_error_line(case, chat_src, tmp_path):
    out = tmp_path / "out"
    if case == "quantized":
        quantized = quantize_checkpoint(chat_src, tmp_path / "q8", 8)
        args, words = (quantized, "--out", out), "is quantized already"
    elif case == "bits":
        args, words = (chat_src, "--out", out, "--bits", 3), "--bits must be 4 or 8, got 3"
    else:
        (out / "x").mkdir(parents=True)
        args, words = (chat_src, "--out", out), "is not an empty folder"
    result = moe("quantize", *args)
    assert result.exit_code != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and words in result.stderr, \
        result.stderr
    assert "Traceback" not in result.output
    assert case == "out" or not out.exists()


def test_a_hub_repo_id_is_downloaded_then_quantized_and_bad_flags_download_nothing(chat_src, tmp_path, monkeypatch):
    files = {p.name: p.read_bytes() for p in chat_src.iterdir() if p.is_file()}
    with FakeHub({"org/tiny-chat": files}) as hub:
        hub.activate(monkeypatch, tmp_path / "hf_home")
        result = moe("quantize", "org/tiny-chat", "--out", tmp_path / "bad", "--bits", 2)
        assert result.exit_code == 2 and "--bits must be 4 or 8" in result.stderr and not hub.requests
        result = moe("quantize", "org/tiny-chat", "--out", tmp_path / "w8", "--bits", 8)
        assert result.exit_code == 0, result.output
        assert any(r.path.endswith("model.safetensors") for r in hub.requests)
    assert result.stdout.startswith("W8A16 (int8, symmetric, groups of 32): ")
    assert ct.parse_config(json.loads((tmp_path / "w8" / "config.json").read_text())).bits == 8
