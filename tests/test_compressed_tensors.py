"""moecli.checkpoints.compressed_tensors against the compressed-tensors library itself: its min-max
quantization, its compressors' tensors (byte for byte), its packing helpers, its name matching, its
config parser, and checkpoints it saves through transformers (and loads back from us)."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                             apply_quantization_config, preset_name_to_scheme)
from compressed_tensors.quantization.lifecycle.forward import quantize as library_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from compressed_tensors.utils.match import is_match
from safetensors.numpy import load_file, save_file
from transformers import CompressedTensorsConfig, LlamaConfig, LlamaForCausalLM

from moecli.checkpoints import compressed_tensors as ct
from moecli.errors import CheckpointError, ConfigError

PACKED, NAIVE = "pack-quantized", "naive-quantized"
# (bits, group_size, symmetric, format, [out, in]); the odd sizes leave part of a packed word unused
CASES = [
    (4, 32, True, PACKED, (24, 96)),
    (4, 32, False, PACKED, (20, 64)),      # 20 rows: the zero points' last packed word is partial
    (4, None, True, PACKED, (16, 36)),     # 36 inputs: the last word holds 4 values and 4 pads
    (8, 32, True, NAIVE, (16, 64)),
    (8, None, True, NAIVE, (16, 48)),
    (8, 16, False, NAIVE, (12, 32)),
    (8, None, True, PACKED, (12, 40)),     # W8A16 as the library itself writes it: 4 per int32
    (8, 16, False, PACKED, (10, 32)),
]
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def ids(case):
    bits, group, symmetric, fmt, _ = case
    return f"int{bits}-{f'g{group}' if group else 'channel'}-{'sym' if symmetric else 'asym'}-{fmt.split('-')[0]}"


def args(bits, group, symmetric):
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="group" if group else "channel", group_size=group)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def weight(shape, dtype, seed=0) -> torch.Tensor:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    w[0, : shape[1] // 2] *= 6          # an outlier half-row, and an all-zero group
    w[1, :16] = 0
    return w.to(dtype)


def library(w: torch.Tensor, bits, group, symmetric, fmt):
    """What llm-compressor does with w: the library's min-max qparams per group (`calculate_qparams`),
    its integer values (`quantize`), and its compressor's stored and decompressed tensors."""
    a = args(bits, group, symmetric)
    grouped = w.unflatten(-1, (w.shape[1] // group, group)) if group else w.unsqueeze(1)
    scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), a)
    values = library_quantize(w, scale, zp, a, dtype=torch.int8)
    scheme = QuantizationScheme(targets=["Linear"], weights=a, format=fmt)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    stored = compressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
    return values, scale, zp, stored, compressor.decompress(stored, scheme)["weight"]


def scheme_of(case, dtype=torch.float32, **kw):
    bits, group, symmetric, fmt, _ = case
    return ct.Scheme(bits, group, symmetric, fmt, scale_dtype=DTYPES[dtype], **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPES.values())
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_quantize_gives_the_librarys_values_scales_and_zero_points(case, dtype):
    bits, group, symmetric, _, shape = case
    w = weight(shape, dtype)
    values, scale, zp, _, _ = library(w, *case[:4])
    ours = ct.quantize(to_numpy(w), bits, group, symmetric)
    np.testing.assert_array_equal(ours[0], values.numpy())
    np.testing.assert_array_equal(ours[1], scale.float().numpy())
    assert ours[1].dtype == np.float32 and ours[0].dtype == np.int8
    if symmetric:
        assert ours[2] is None
    else:
        np.testing.assert_array_equal(ours[2], zp.numpy())
    assert ours[0].min() == -(1 << (bits - 1))   # the full grid: the most negative weight's group reaches qmin


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPES.values())
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_encode_writes_the_librarys_tensors_byte_for_byte(case, dtype):
    w = weight(case[4], dtype)
    *_, stored, _ = library(w, *case[:4])
    ours = ct.encode(*ct.quantize(to_numpy(w), *case[:3]), scheme_of(case, dtype))
    assert sorted(ours) == sorted(stored)
    for name, tensor in stored.items():
        theirs = to_numpy(tensor)
        assert (ours[name].dtype, ours[name].shape) == (theirs.dtype, theirs.shape), name
        assert ours[name].tobytes() == theirs.tobytes(), name


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPES.values())
@pytest.mark.parametrize("case", CASES, ids=ids)
def test_decode_of_the_librarys_tensors_gives_its_dequantized_weight(case, dtype):
    w = weight(case[4], dtype, seed=1)
    values, scale, _, stored, dequantized = library(w, *case[:4])
    tensors = {f"model.layers.0.mlp.up_proj.{k}": to_numpy(v) for k, v in stored.items()}
    ours = ct.decode(tensors, "model.layers.0.mlp.up_proj", scheme_of(case))
    np.testing.assert_array_equal(ours[0], values.numpy())
    np.testing.assert_array_equal(ours[1], scale.float().numpy())
    # (q - z) * s is exact in float32, so rounding it to the library's dtype gives its result exactly
    expected = to_numpy(dequantized)
    assert ct.dequantize(*ours).astype(expected.dtype).tobytes() == expected.tobytes()


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_encode_then_decode_is_the_identity(case):
    bits, group, symmetric, _, (out, d_in) = case
    rng = np.random.default_rng(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    values = rng.integers(lo, hi + 1, (out, d_in)).astype(np.int8)
    values[0, :2] = lo, hi                               # both ends of the range survive
    groups = d_in // group if group else 1
    scales = rng.uniform(1e-4, 1, (out, groups)).astype(np.float32)
    zp = None if symmetric else rng.integers(lo, hi + 1, (out, groups)).astype(np.int8)
    tensors = {f"x.{k}": v for k, v in ct.encode(values, scales, zp, scheme_of(case)).items()}
    got = ct.decode(tensors, "x", scheme_of(case))
    np.testing.assert_array_equal(got[0], values)
    np.testing.assert_array_equal(got[1], scales)
    assert (got[2] is None) if symmetric else np.array_equal(got[2], zp)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [1, 7, 8, 9, 33, 64])
def test_packing_matches_the_librarys_helpers(bits, cols):
    lo = -(1 << (bits - 1))
    # 9 rows: packed down dim 0 they fill 2+ words (the library's 4-bit unpack fails on a single word there)
    values = np.random.default_rng(cols).integers(lo, -lo, (9, cols)).astype(np.int8)
    for dim in (0, 1):
        theirs = pack_to_int32(torch.from_numpy(values), bits, packed_dim=dim).numpy()
        ours = ct._pack(values, bits) if dim else ct._pack(values.T, bits).T
        np.testing.assert_array_equal(ours, theirs)
        back = unpack_from_int32(torch.from_numpy(theirs), bits, torch.Size(values.shape), packed_dim=dim).numpy()
        np.testing.assert_array_equal(ct._unpack(ours, bits, cols) if dim else ct._unpack(ours.T, bits, 9).T, back)


def test_int4_bit_layout():
    """The first input column sits in the lowest nibble, each value stored as q + 8."""
    values = np.array([[0, 1, 2, 3, 4, 5, 6, 7, -8, -1]], np.int8)
    packed = ct._pack(values, 4)
    assert packed.dtype == np.int32 and packed.shape == (1, 2)
    assert packed.view(np.uint32).tolist() == [[0xFEDCBA98, 0x70]]


NAMES = ["lm_head", "model.layers.0.mlp.gate", "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate",
         "model.layers.3.self_attn.q_proj", "model.layers.3.block_sparse_moe.gate", "xlm_head"]


@pytest.mark.parametrize("targets, ignore", [
    (["Linear"], ["lm_head"]),
    (["Linear"], ["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate"]),
    (["re:.*self_attn.*", "re:model.layers.0.mlp.*"], ["model.layers.0.mlp.gate"]),
    (["lm_head"], []),
    (["re:.*_proj$"], ["re:layers"]),   # re.match anchors at the start: "re:layers" ignores nothing here
])
def test_is_quantized_matches_the_librarys_name_matching(targets, ignore):
    scheme = ct.Scheme(4, 32, targets=tuple(targets), ignore=tuple(ignore))
    expected = [is_match(n, torch.nn.Linear(1, 1), targets, ignore) for n in NAMES]
    assert [ct.is_quantized(n, scheme) for n in NAMES] == expected
    assert any(expected)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_config_for_is_what_the_library_writes_and_parses(case):
    fmt = case[3]
    ignore = ["lm_head", "re:.*mlp.gate$"]
    ours = ct.config_for(scheme_of(case), ignore)
    library_config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args(*case[:3]), format=fmt)},
        format=fmt, quantization_status="compressed", ignore=ignore)
    # ModelCompressor.update_config writes model_dump() plus these (and its own version, left out here)
    assert ours == {**library_config.model_dump(), "sparsity_config": {}, "transform_config": {}}
    parsed = QuantizationConfig.model_validate(json.loads(json.dumps(ours)))
    assert parsed == library_config
    assert CompressedTensorsConfig.from_dict({"quantization_config": ours}).quantization_config == library_config
    assert ct.parse_config({"quantization_config": ours}) == scheme_of(case, torch.bfloat16, ignore=tuple(ignore))


def tiny_llama(seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def linears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]], ids=ids)
def test_reads_a_checkpoint_the_library_saved(case, tmp_path):
    """A model quantized and saved as llm-compressor does (apply config, calibrate min-max, compress,
    save_pretrained, update_config): our parse_config, is_quantized and decode read it."""
    bits, group, symmetric, fmt, _ = case
    model = tiny_llama()
    ignore = ["lm_head", "re:.*mlp.gate_proj$"]
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args(bits, group, symmetric))},
        ignore=ignore))
    for m in linears(model).values():
        if hasattr(m, "weight_scale"):
            w = m.weight.data
            grouped = w.unflatten(-1, (w.shape[1] // group, group)) if group else w.unsqueeze(1)
            scale, zp = calculate_qparams(grouped.amin(-1), grouped.amax(-1), m.quantization_scheme.weights)
            m.weight_scale.data.copy_(scale)
            m.weight_zero_point.data.copy_(zp)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(tmp_path)
    compressor.update_config(tmp_path)
    compressor.decompress_model(model)              # the library's dequantized weights: the reference

    scheme = ct.parse_config(json.loads((tmp_path / "config.json").read_text()))
    assert scheme == ct.Scheme(bits, group, symmetric, fmt, ignore=scheme.ignore)
    tensors = load_file(tmp_path / "model.safetensors")
    quantized = [n for n in linears(model) if ct.is_quantized(n, scheme)]
    assert len(quantized) == 2 * 6          # q, k, v, o, up, down of both layers; gate_proj and lm_head stay float
    for name, module in linears(model).items():
        stored_quantized = f"{name}.weight_scale" in tensors
        assert ct.is_quantized(name, scheme) == stored_quantized, name
        if stored_quantized:
            expected = to_numpy(module.weight.data)
            ours = ct.dequantize(*ct.decode(tensors, name, scheme))
            assert ours.astype(expected.dtype).tobytes() == expected.tobytes(), name


def test_transformers_loads_a_checkpoint_we_wrote(tmp_path):
    """Our encode + config_for, written over a float checkpoint: transformers (through the library)
    loads it and decompresses exactly our dequantized weights."""
    tiny_llama().save_pretrained(tmp_path)
    scheme = ct.Scheme(4, 32, ignore=("lm_head",))
    tensors, expected = load_file(tmp_path / "model.safetensors"), {}
    for name in [n[: -len(".weight")] for n in tensors if n.endswith("_proj.weight")]:
        if ct.is_quantized(name, scheme):
            canonical = ct.quantize(tensors.pop(f"{name}.weight"), scheme.bits, scheme.group_size)
            expected[name] = ct.dequantize(*canonical).astype(ml_dtypes.bfloat16)
            tensors.update({f"{name}.{k}": v for k, v in ct.encode(*canonical, scheme).items()})
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = ct.config_for(scheme, ["lm_head"])
    (tmp_path / "config.json").write_text(json.dumps(config))

    model = LlamaForCausalLM.from_pretrained(tmp_path)
    model(torch.tensor([[1, 2, 3]]))               # the first forward decompresses
    assert len(expected) == 14
    for name, w in expected.items():
        assert to_numpy(model.get_submodule(name).weight.data).tobytes() == w.tobytes(), name


def library_config(fmt=PACKED, **groups) -> dict:
    """config.json's quantization_config as the library writes it for these config groups."""
    return {"quantization_config": QuantizationConfig(config_groups=groups, format=fmt).model_dump()}


def scheme_dict(preset):
    return preset_name_to_scheme(preset, ["Linear"])


@pytest.mark.parametrize("config, words", [
    (library_config(group_0=scheme_dict("W8A8"), fmt="int-quantized"), "activation quantization"),
    (library_config(group_0=scheme_dict("FP8")), "activation quantization"),
    (library_config(group_0=scheme_dict("NVFP4A16"), fmt="nvfp4-pack-quantized"), "4-bit float weights"),
    (library_config(group_0=scheme_dict("W3A16")), "3-bit weights"),
    (library_config(group_0=scheme_dict("W4A16"), group_1=QuantizationScheme(
        targets=["re:.*experts.*"], weights=args(8, None, True))), "mixed precision"),
    (library_config(group_0=scheme_dict("W4A16"), fmt="dense"), "'dense' format"),
    (library_config(group_0=QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=8))), "'tensor'"),
    ({"quantization_config": {**library_config(group_0=scheme_dict("W4A16"))["quantization_config"],
                              "kv_cache_scheme": {"num_bits": 8, "type": "float"}}}, "KV-cache"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}}}, "float weights"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": PACKED, "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 128, "actorder": "group"}}}}}, "g_idx"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"W4A16": ["Linear"]}}}, "preset"),
], ids=["w8a8", "fp8", "nvfp4", "int3", "mixed", "dense", "tensor-strategy", "kv-cache", "fp8-weight-only", "g_idx",
        "preset"])
def test_parse_config_refuses_what_moecli_cannot_read_in_one_line(config, words):
    with pytest.raises(ConfigError, match=words) as err:
        ct.parse_config(json.loads(json.dumps(config)))
    assert "\n" not in str(err.value) and err.value.hint


@pytest.mark.parametrize("config", [{}, {"quantization_config": {"quant_method": "gptq", "bits": 4}},
                                    {"quantization_config": None}])
def test_parse_config_is_none_without_a_compressed_tensors_config(config):
    assert ct.parse_config(config) is None


def test_decode_names_a_missing_or_malformed_tensor():
    scheme = ct.Scheme(4, 32, scale_dtype="float32")
    good = {f"p.{k}": v for k, v in ct.encode(*ct.quantize(np.ones((8, 64), np.float32), 4, 32), scheme).items()}
    with pytest.raises(CheckpointError, match=r"p\.weight_packed is missing"):
        ct.decode({k: v for k, v in good.items() if k != "p.weight_packed"}, "p", scheme)
    with pytest.raises(CheckpointError, match=r"p\.weight_scale .* expected shape \[8, 2\]"):
        ct.decode({**good, "p.weight_scale": np.ones((8, 3), np.float32)}, "p", scheme)
    with pytest.raises(CheckpointError, match="not int32"):
        ct.decode({**good, "p.weight_packed": good["p.weight_packed"].astype(np.int64)}, "p", scheme)
    with pytest.raises(CheckpointError, match=r"p\.weight_packed .* expected shape \[8, 9\]"):
        ct.decode({**good, "p.weight_shape": np.array([8, 72], np.int64)}, "p", scheme)


def test_decode_reads_zero_points_stored_unpacked_in_a_packed_checkpoint():
    """Older pack-quantized checkpoints kept asymmetric zero points as plain int8 [out, groups]."""
    scheme = ct.Scheme(4, 16, symmetric=False, scale_dtype="float32")
    canonical = ct.quantize(np.random.default_rng(0).normal(size=(12, 32)).astype(np.float32), 4, 16, False)
    tensors = {f"p.{k}": v for k, v in ct.encode(*canonical, scheme).items()}
    tensors["p.weight_zero_point"] = canonical[2]
    np.testing.assert_array_equal(ct.decode(tensors, "p", scheme)[2], canonical[2])
    del tensors["p.weight_zero_point"]
    with pytest.raises(CheckpointError, match=r"p\.weight_zero_point is missing"):
        ct.decode(tensors, "p", scheme)


def test_scheme_takes_group_size_minus_one_as_per_channel():
    assert ct.Scheme(8, -1, targets=["Linear"]) == ct.Scheme(8, None)
    with pytest.raises(ValueError):
        ct.Scheme(3, 32)
