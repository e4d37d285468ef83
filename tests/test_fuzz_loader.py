"""Property tests: a damaged checkpoint fails with moecli's own errors, never anything else.

Hypothesis feeds the loader (`moecli.model.config.load_config`, `moecli.inference.engine.load_model`, and the download
check `moecli.hub.download.validate_checkpoint`) randomly corrupted copies of a tiny valid checkpoint:
config.json with keys dropped, values of the wrong type, zero, negative, huge or non-finite, nested
garbage, or not JSON at all; safetensors files truncated, with flipped bytes, or with a rewritten
header (wrong dtypes, shapes that do not match the byte counts, offsets out of range). Each either
loads or raises a `MoecliError` subclass, which the CLI prints as one line. 50 examples per property by
default; FUZZ_EXAMPLES=1000 searches harder.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import struct
from pathlib import Path

import ml_dtypes  # noqa: F401 - registers bfloat16 and the float8 types with numpy
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hf_models import build, save
from moecli.checkpoints.safetensors import SAFETENSORS_DTYPES
from moecli.hub import download as hub
from moecli.checkpoints.families import load_config
from moecli.inference.engine import load_model
from moecli.errors import MoecliError

EXAMPLES = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 50)), deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    print_blob=True)
TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64)
MLA = dict(num_key_value_heads=2, n_routed_experts=2, moe_intermediate_size=8, n_shared_experts=1, kv_lora_rank=8,
           qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)  # transformers' MLA: as many kv heads as heads
FAMILIES = {
    "mixtral": dict(num_local_experts=2),
    "qwen2_moe": dict(num_experts=2, moe_intermediate_size=8, shared_expert_intermediate_size=8,
                      decoder_sparse_step=1, mlp_only_layers=[1]),
    "qwen3_moe": dict(num_experts=2, moe_intermediate_size=8),
    "olmoe": dict(num_experts=2),
    "glm4_moe": dict(n_routed_experts=2, moe_intermediate_size=8, head_dim=8, first_k_dense_replace=1,
                     n_shared_experts=1, num_nextn_predict_layers=0),
    "minimax_m2": dict(num_local_experts=2, head_dim=8, rotary_dim=4),
    "gpt_oss": dict(num_local_experts=2, head_dim=8, sliding_window=4),
    "deepseek_v2": dict(MLA, q_lora_rank=None, first_k_dense_replace=1),
    "deepseek_v3": dict(MLA, q_lora_rank=8, n_group=1, topk_group=1),
    "glm4_moe_lite": dict(MLA, q_lora_rank=8, mlp_layer_types=["dense", "sparse"]),
}
_fresh = itertools.count()


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    """One tiny valid checkpoint per family (config.json + model.safetensors)."""
    return {family: save(build(family, **{**TINY, **extra}), tmp_path_factory.mktemp(family))
            for family, extra in FAMILIES.items()}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def copy_of(original: Path, scratch: Path) -> Path:
    folder = scratch / f"case{next(_fresh)}"
    shutil.copytree(original, folder)
    return folder


def only_moecli_errors(fn, *args, **kwargs) -> None:
    """Run fn: success, or a MoecliError with a message; any other exception fails the test."""
    try:
        fn(*args, **kwargs)
    except MoecliError as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"
        event(f"{fn.__name__}: {type(err).__name__}: {str(err)[:40]}")
    else:
        event(f"{fn.__name__}: ok")


# -- config.json ------------------------------------------------------------------------------------

BAD_NUMBERS = st.sampled_from([0, -1, -2**31, 2**31, 2**63, 10**30, 10**400, 0.5, -0.0, float("nan"),
                               float("inf"), float("-inf"), 1e308, True, False])
SMALL_INTS = st.integers(min_value=-3, max_value=9)
GARBAGE = st.recursive(
    st.none() | st.booleans() | SMALL_INTS | BAD_NUMBERS | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
EXTRA_KEYS = ["model_type", "rope_scaling", "rope_parameters", "rope_theta", "quantization_config", "head_dim",
              "sliding_window", "use_sliding_window", "layer_types", "max_window_layers", "mlp_only_layers",
              "decoder_sparse_step", "eos_token_id", "bos_token_id", "hidden_act", "tie_word_embeddings",
              "clip_qkv", "attention_bias", "qkv_bias", "norm_topk_prob", "rms_norm_eps", "topk_method",
              "routed_scaling_factor", "partial_rotary_factor", "use_qk_norm", "swiglu_limit", "swiglu_alpha",
              "moe_layer_freq", "rope_interleave", "num_local_experts", "num_experts_per_tok"]
ROPES = st.fixed_dictionaries({"rope_type": st.sampled_from(["default", "linear", "yarn", "dynamic", 3])},
                              optional={"factor": BAD_NUMBERS | SMALL_INTS, "rope_theta": BAD_NUMBERS | SMALL_INTS,
                                        "original_max_position_embeddings": BAD_NUMBERS | SMALL_INTS,
                                        "beta_fast": BAD_NUMBERS, "beta_slow": BAD_NUMBERS,
                                        "mscale": BAD_NUMBERS | SMALL_INTS, "mscale_all_dim": BAD_NUMBERS | SMALL_INTS,
                                        "attention_factor": BAD_NUMBERS})


@st.composite
def config_mutations(draw):
    """A list of (action, key, value) edits to apply to a valid config.json."""
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["drop", "set", "set", "rope"]))
        key = draw(st.sampled_from(sorted(TINY) + sorted(set(itertools.chain(*FAMILIES.values()))) + EXTRA_KEYS))
        if action == "rope":
            edits.append(("set", draw(st.sampled_from(["rope_scaling", "rope_parameters"])), draw(ROPES)))
        else:
            edits.append((action, key, draw(BAD_NUMBERS | SMALL_INTS | GARBAGE) if action == "set" else None))
    return edits


def write_config(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config))  # NaN and Infinity as Python's json writes them


@EXAMPLES
@given(family=st.sampled_from(sorted(FAMILIES)), edits=config_mutations())
def test_mutated_config_json_gives_only_moecli_errors(originals, scratch, family, edits):
    folder = copy_of(originals[family], scratch)
    config = json.loads((folder / "config.json").read_text())
    for action, key, value in edits:
        if action == "drop":
            config.pop(key, None)
        else:
            config[key] = value
    write_config(folder, config)
    only_moecli_errors(load_config, folder)
    only_moecli_errors(load_model, folder, dtype="float32")


RAW_CONFIGS = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"[]", b"null", b"42", b'"mixtral"', b"\xff\xfe{}", b'{"model_type": ["mixtral"]}',
                     b'{"model_type": {"a": 1}}', b'{"model_type": "mixtral"}', b"[" * 100_000,
                     b'{"vocab_size": ' + b"9" * 5000 + b"}", b'{"model_type": "mixtral", "quantization_config": '
                     b'{"quant_method": "gptq", "bits": 4}}']),
    GARBAGE.map(lambda g: json.dumps(g).encode()),
)


@EXAMPLES
@given(raw=RAW_CONFIGS, cut=st.integers(0, 4000))
def test_non_json_or_truncated_config_gives_only_moecli_errors(originals, scratch, raw, cut):
    folder = copy_of(originals["mixtral"], scratch)
    text = (folder / "config.json").read_bytes()
    for data in (raw, text[:cut]):
        (folder / "config.json").write_bytes(data)
        only_moecli_errors(load_model, folder, dtype="float32")


# -- safetensors --------------------------------------------------------------------------------------

def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header, body: bytes, length_delta: int = 0) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + body


VALID_DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3", "F8_E5M2",
                                "F8_E8M0", "F4"])
DTYPES = VALID_DTYPES | st.sampled_from(["I4", "Q4_K", "", "f32"]) | GARBAGE
SHAPES = st.lists(st.integers(0, 40), max_size=4) | st.lists(
    st.integers(-2, 40) | st.sampled_from([2**31, 2**63, 10**20]), max_size=4) | GARBAGE


@st.composite
def header_edits(draw, names: list[str], body_size: int):
    """Mostly well-typed edits (so the safetensors parser and the loader's own checks are reached), some
    garbage."""
    offsets = st.lists(st.integers(0, body_size), min_size=2, max_size=2).map(sorted) | st.lists(
        st.integers(-10, body_size + 10) | st.sampled_from([2**64, 10**30, 1.5]), max_size=3) | GARBAGE
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        field = draw(st.sampled_from(["dtype", "dtype", "shape", "shape", "data_offsets", "data_offsets",
                                      "retype", "drop_field", "drop_tensor", "rename", "replace", "metadata", "add"]))
        value = {"dtype": DTYPES, "shape": SHAPES, "data_offsets": offsets, "replace": GARBAGE, "metadata": GARBAGE,
                 "add": GARBAGE, "rename": st.text(max_size=12), "retype": VALID_DTYPES}.get(field, st.none())
        edits.append((name, field, draw(value), draw(st.sampled_from(["dtype", "shape", "data_offsets"]))))
    return edits


def apply_header_edits(header: dict, edits) -> dict:
    header = json.loads(json.dumps(header))
    for name, field, value, key in edits:
        entry = header.get(name)
        if field == "drop_tensor":
            header.pop(name, None)
        elif field == "rename" and name in header:
            header[value] = header.pop(name)
        elif field == "replace":
            header[name] = value
        elif field == "metadata":
            header["__metadata__"] = value
        elif field == "add":
            header[f"{name}.extra"] = value if isinstance(value, dict) else {"dtype": "F32", "shape": [1],
                                                                             "data_offsets": [0, 4]}
        elif field == "retype" and isinstance(entry, dict):  # same bytes, another dtype, consistent shape
            offsets = entry.get("data_offsets")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
                continue
            size = offsets[1] - offsets[0]
            try:
                itemsize = np.dtype(SAFETENSORS_DTYPES[value]).itemsize
            except TypeError:
                itemsize = 1
            entry.update(dtype=value, shape=[size // itemsize] if value != "F4" else [size * 2])
        elif isinstance(entry, dict):
            if field == "drop_field":
                entry.pop(key, None)
            else:
                entry[field] = value
    return header


def safetensors_bytes(originals) -> bytes:
    """The valid file (read here, not taken as a fixture, so that failure reports stay short)."""
    return (originals["mixtral"] / "model.safetensors").read_bytes()


def check_damaged(originals, scratch, data: bytes) -> None:
    folder = copy_of(originals["mixtral"], scratch)
    (folder / "model.safetensors").write_bytes(data)
    only_moecli_errors(load_model, folder, dtype="float32")
    only_moecli_errors(hub.validate_checkpoint, folder)


@EXAMPLES
@given(data=st.data())
def test_truncated_or_flipped_safetensors_give_only_moecli_errors(originals, scratch, data):
    blob = bytearray(safetensors_bytes(originals))
    (n,) = struct.unpack("<Q", blob[:8])
    kind = data.draw(st.sampled_from(["truncate", "flip_length", "flip_header", "flip_data", "append"]))
    if kind == "truncate":
        blob = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "append":
        blob += data.draw(st.binary(min_size=1, max_size=16))
    else:
        low, high = {"flip_length": (0, 7), "flip_header": (8, 8 + n - 1), "flip_data": (8 + n, len(blob) - 1)}[kind]
        for position in data.draw(st.lists(st.integers(low, high), min_size=1, max_size=4)):
            blob[position] ^= data.draw(st.integers(1, 255))
    check_damaged(originals, scratch, bytes(blob))


@EXAMPLES
@given(data=st.data())
def test_rewritten_safetensors_header_gives_only_moecli_errors(originals, scratch, data):
    header, body = split_safetensors(safetensors_bytes(originals))
    names = sorted(k for k in header if k != "__metadata__")
    edited = apply_header_edits(header, data.draw(header_edits(names, len(body))))
    body = body[:data.draw(st.integers(0, len(body)))] if data.draw(st.integers(0, 3)) == 0 else body
    check_damaged(originals, scratch, join_safetensors(edited, body, data.draw(st.sampled_from([0] * 8 + [-1, 1, 2**40]))))


def test_quantized_dtype_in_header_is_named(originals, scratch):
    """A consistent header (byte counts match) whose weights are int8: the quantized-checkpoint error."""
    from moecli.errors import CheckpointError

    header, body = split_safetensors(safetensors_bytes(originals))
    name = "model.layers.0.self_attn.q_proj.weight"
    start, end = header[name]["data_offsets"]
    rows, cols = header[name]["shape"]
    # the same bytes read as int8 with four times the columns: a well-formed file, a quantized tensor
    header[name] = {"dtype": "I8", "shape": [rows, cols * 4], "data_offsets": [start, end]}
    folder = copy_of(originals["mixtral"], scratch)
    (folder / "model.safetensors").write_bytes(join_safetensors(header, body))
    with pytest.raises(CheckpointError, match="quantized checkpoints are not supported") as err:
        load_model(folder, dtype="float32")
    assert name in str(err.value) and "unquantized" in err.value.hint
