"""moecli.checkpoints.fp8 (block-FP8 checkpoints) against torch and transformers: the cases whose d_expert is a
whole number of block rows keep their experts packed (moecli.model.fp8; more in test_fp8_kernels.py), the
others (`ragged`: d_expert 24 in 16-row blocks) dequantize them at load like every other FP8 tensor.

The tiny checkpoints are written the way the Hub stores DeepSeek-V3 / Qwen3-FP8: every Linear weight
but the routers, the LM head and the ones listed in modules_to_not_convert becomes float8_e4m3fn
[out, in] with a float32 `weight_scale_inv` [ceil(out / bo), ceil(in / bi)] (amax / 448 per block), and
config.json gets the `quantization_config` block. transformers' own dequantizing load of the same
folder is the oracle where the dimensions are multiples of the block (elsewhere it tiles differently,
see the module doc of moecli.checkpoints.fp8): there the oracle is the float model holding the weights
dequantized by torch, block index = row // bo, col // bi, as the FP8 GEMMs and DeepSeek's weight_dequant do.
"""
from __future__ import annotations

import json
import math

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hf_models import build, hf_greedy, hf_logits, save
from moecli import generate_tokens, load_model
from moecli.checkpoints import fp8, loader
from moecli.checkpoints.families import load_config
from moecli.checkpoints.summary import validate_checkpoint
from moecli.errors import CheckpointError, ConfigError, ResourceError
from moecli.model.sizes import parameter_counts

PROMPT = [1, 5, 9, 33, 7, 64, 2, 100, 17, 3, 90, 41]
FP8_MAX = 448.0
EAGER = dict(attn_implementation="eager", experts_implementation="eager")
KEEP_FLOAT = ("model.layers.1.self_attn.o_proj",)  # a Linear the checkpoint leaves unquantized, as listed


def is_router(name: str) -> bool:
    return name.endswith(".gate.weight") or "shared_expert_gate" in name


def quantize(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., rows, cols] as the Hub's block-FP8 (weight, weight_scale_inv): per block s = amax / 448
    (1 for an all-zero block), weight = e4m3(w / s); the last block row / column may be partial."""
    bo, bi = block
    *lead, rows, cols = w.shape
    padded = torch.zeros(*lead, math.ceil(rows / bo) * bo, math.ceil(cols / bi) * bi)
    padded[..., :rows, :cols] = w
    tiles = padded.unflatten(-1, (-1, bi)).unflatten(-3, (-1, bo))           # [..., R, bo, C, bi]
    scale = tiles.abs().amax(dim=(-3, -1)) / FP8_MAX                         # [..., R, C]
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    return (w / expand(scale, block, rows, cols)).to(torch.float8_e4m3fn), scale


def expand(scale: torch.Tensor, block, rows: int, cols: int) -> torch.Tensor:
    return scale.repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)[..., :rows, :cols]


def dequantize(q: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """The reference: each element times its block's scale, in float32."""
    return q.float() * expand(scale, block, *q.shape[-2:])


def fp8_checkpoint(hf, folder, block, fused: bool = False, keep=KEEP_FLOAT, fmt: str = "e4m3"):
    """Save `hf` and rewrite its weights as a block-FP8 checkpoint; returns {name: dequantized weight}
    of the quantized tensors. `fused`: transformers' own state dict (experts.gate_up_proj [e, 2f, d]
    and experts.down_proj 3-D tensors, quantized too) instead of save_pretrained's per-expert tensors."""
    save(hf, folder)
    state = ({k: v.contiguous() for k, v in hf.state_dict().items()} if fused
             else load_file(folder / "model.safetensors"))
    out, dequantized = {}, {}
    for name, w in state.items():
        prefix = name.removesuffix(".weight")
        linear = (name.endswith(".weight") and w.ndim == 2 and "embed" not in name and not is_router(name)
                  and name != "lm_head.weight" and prefix not in keep)
        if linear or (fused and w.ndim == 3):
            out[name], out[name + "_scale_inv"] = quantize(w, block)
            dequantized[name] = dequantize(out[name], out[name + "_scale_inv"], block)
        else:
            out[name] = w
    (folder / "model.safetensors").unlink()
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    routers = sorted({n.removesuffix(".weight") for n in state if is_router(n)})
    config["quantization_config"] = {
        "quant_method": "fp8", "fmt": fmt, "activation_scheme": "dynamic", "weight_block_size": list(block),
        "modules_to_not_convert": ["lm_head", *keep, *routers]}
    (folder / "config.json").write_text(json.dumps(config))
    return dequantized


def transformers_dequantized(folder):
    """transformers' own load of the FP8 checkpoint, dequantized to float32 on the CPU."""
    config = transformers.FineGrainedFP8Config(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=config,
                                                             **EAGER).eval()


def float_twin(folder, twin, dequantized: dict):
    """transformers' float model of the checkpoint in `folder` with the reference-dequantized weights: the
    same files with each FP8 weight replaced by its float32 dequantization, and no quantization_config."""
    twin.mkdir(exist_ok=True)
    state = load_file(folder / "model.safetensors")
    state = {k: dequantized.get(k, v) for k, v in state.items() if not k.endswith("_scale_inv")}
    save_file(state, twin / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (twin / "config.json").write_text(json.dumps(config))
    return transformers.AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32, **EAGER).eval()


def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    assert np.abs(ours - theirs).max() <= 1e-3 * np.abs(theirs).max()


# ----------------------------------------------------------------------------- the dequantization itself

def test_every_e4m3_code_decodes_as_torch_does():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    theirs = codes.view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(fp8.E4M3_VALUES, theirs)   # NaN where torch has NaN (0x7f, 0xff)
    assert np.isnan(fp8.E4M3_VALUES).sum() == 2 and np.nanmax(fp8.E4M3_VALUES) == FP8_MAX


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape,block", [
    ((40, 24), (16, 16)),          # neither dimension a multiple: partial last block row and column
    ((36, 20), (8, 16)),           # a non-square block: rows and columns must not be swapped
    ((5, 7), (16, 16)),            # smaller than one block
    ((3, 48, 40), (16, 16)),       # a fused expert stack: one grid per expert
    ((64, 32), (16, 16)),          # multiples
    ((3, 700, 520), (128, 128)),   # over fp8.PARALLEL_MIN weights: block rows on threads
], ids=str)
def test_dequantize_matches_torch(shape, block, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=gen) * torch.rand(shape[:-1] + (1,), generator=gen) * 10
    q, scale = quantize(w, block)
    ours = fp8.dequantize(q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn), scale.numpy(), block,
                          np.float32 if dtype == torch.float32 else ml_dtypes.bfloat16)
    theirs = dequantize(q, scale, block).to(dtype)
    assert ours.shape == shape and ours.ctypes.data % 64 == 0
    assert ours.view(np.uint8).tobytes() == theirs.view(torch.uint8).numpy().tobytes()
    relative = float((theirs.float() - w).abs().max() / w.abs().max())
    assert 0 < relative < 0.07  # really FP8: e4m3 keeps 3 mantissa bits


def test_dequantize_refuses_a_misshapen_grid():
    q = np.zeros((40, 24), ml_dtypes.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"\[3, 2\]"):
        fp8.dequantize(q, np.ones((2, 2), np.float32), (16, 16))


# ----------------------------------------------------------------------------- whole models

DEEPSEEK = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
                moe_intermediate_size=16, q_lora_rank=24, n_routed_experts=8, n_group=4, topk_group=2,
                num_experts_per_tok=3, first_k_dense_replace=1, n_shared_experts=2, num_hidden_layers=3)

# name: (family, overrides, block, fused, oracle): "transformers" = its own dequantizing load (every
# dimension a multiple of the block), "reference" = the float model holding torch's dequantization
CASES = {
    "qwen3-16x16": ("qwen3_moe", dict(num_experts=4, moe_intermediate_size=32, head_dim=16, norm_topk_prob=True),
                    (16, 16), False, "transformers"),
    "mixtral-8x16": ("mixtral", dict(num_local_experts=4, intermediate_size=48), (8, 16), False, "transformers"),
    "qwen2-shared-expert": ("qwen2_moe", dict(num_experts=4, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=32), (16, 16), False, "transformers"),
    "qwen3-ragged": ("qwen3_moe", dict(hidden_size=40, num_experts=4, moe_intermediate_size=24, head_dim=16),
                     (16, 16), False, "reference"),
    "mixtral-fused-ragged": ("mixtral", dict(num_local_experts=4), (16, 12), True, "reference"),
    # the released FP8 families: latent attention (kv_a_proj_with_mqa: 24 rows, as 576 is 4.5 blocks of
    # 128 on the Hub), shared experts, a dense first layer; MiniMax-M2's own "fmt" spelling
    "deepseek-v3-8x8": ("deepseek_v3", DEEPSEEK, (8, 8), False, "transformers"),
    "deepseek-v3-ragged": ("deepseek_v3", DEEPSEEK, (16, 16), False, "reference"),
    "minimax-m2-8x8": ("minimax_m2", dict(num_local_experts=6, head_dim=16, rotary_dim=8), (8, 8), False,
                       "transformers"),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(oracle model, moecli model, the original float model) for one case."""
    family, overrides, block, fused, oracle = CASES[request.param]
    hf = build(family, **overrides)
    folder = tmp_path_factory.mktemp(request.param)
    dequantized = fp8_checkpoint(hf, folder, block, fused=fused,
                                 fmt="float8_e4m3fn" if family == "minimax_m2" else "e4m3")
    theirs = (transformers_dequantized(folder) if oracle == "transformers"
              else float_twin(folder, tmp_path_factory.mktemp(request.param + "-float"), dequantized))
    return theirs, load_model(folder, dtype="float32"), hf


def test_logits_match_transformers(case):
    theirs, ours, original = case
    ids = np.array([PROMPT, PROMPT[::-1]])
    logits = np.asarray(ours(ids))
    expected = hf_logits(theirs, ids).numpy()
    assert_close(logits, expected)
    # and the weights really were FP8: the unquantized model's logits are measurably elsewhere
    assert np.abs(hf_logits(original, ids).numpy() - expected).max() > 1e-2 * np.abs(expected).max()


def test_greedy_generation_matches_transformers(case):
    theirs, ours, _ = case
    assert generate_tokens(ours, PROMPT[:7], max_new_tokens=16, temperature=0.0) == hf_greedy(theirs, PROMPT[:7], 16)


# ----------------------------------------------------------------------------- loading details

@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    """A small qwen3_moe block-FP8 checkpoint whose dimensions are not multiples of its 16x16 blocks,
    and the reference dequantization of its FP8 tensors."""
    hf = build("qwen3_moe", hidden_size=40, num_experts=4, moe_intermediate_size=24, head_dim=16)
    folder = tmp_path_factory.mktemp("ragged")
    return folder, fp8_checkpoint(hf, folder, (16, 16))


def copy_of(folder, tmp_path, edit=None, config_edit=None):
    """A copy of the checkpoint in `folder`, its tensors {name: tensor} passed through `edit`."""
    state = load_file(folder / "model.safetensors")
    save_file(edit(state) if edit else state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config_edit(config) if config_edit else config))
    return tmp_path


def test_bfloat16_load_rounds_the_float32_dequantization_once(ragged):
    folder, dequantized = ragged
    params = load_model(folder, dtype="bfloat16").params
    q = np.asarray(params["transformer/layer_0/attn/q_proj"]["w"])                     # [in, out]
    expected = dequantized["model.layers.0.self_attn.q_proj.weight"].T.to(torch.bfloat16)
    assert q.dtype == ml_dtypes.bfloat16 and q.tobytes() == expected.contiguous().view(torch.uint16).numpy().tobytes()
    gate = np.asarray(params["transformer/layer_1/moe"]["w_gate"][2])                   # expert 2, [d, f]
    expected = dequantized["model.layers.1.mlp.experts.2.gate_proj.weight"].T.to(torch.bfloat16)
    assert gate.tobytes() == expected.contiguous().view(torch.uint16).numpy().tobytes()


def test_weight_and_scale_in_different_shards_pair_up(ragged, tmp_path):
    """Sharded checkpoints may put a weight and its scale in two files: every scale here is in the
    second shard, after every weight, so each FP8 weight waits for its scale."""
    folder, _ = ragged
    state = load_file(folder / "model.safetensors")
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in state.items() if not k.endswith("_scale_inv")},
              "model-00002-of-00002.safetensors": {k: v for k, v in state.items() if k.endswith("_scale_inv")}}
    for name, tensors in shards.items():
        save_file(tensors, tmp_path / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, tensors in shards.items() for k in tensors}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    np.testing.assert_array_equal(np.asarray(load_model(tmp_path, dtype="float32")([PROMPT])),
                                  np.asarray(load_model(folder, dtype="float32")([PROMPT])))


def test_the_memory_check_counts_the_dequantized_size(ragged, monkeypatch):
    """FP8 is a quarter of float32 on disk, but dequantized weights are float32 in memory once loaded
    (here the experts too: d_expert 24 is no whole number of 16-row blocks)."""
    assert not load_config(ragged[0]).quant
    folder, _ = ragged
    f32 = parameter_counts(load_config(folder)).total * 4
    on_disk = (folder / "model.safetensors").stat().st_size
    assert on_disk < 0.6 * f32
    monkeypatch.setattr(loader, "available_memory", lambda: loader.FreeMemory(f32 - 1, "in host memory", False))
    with pytest.raises(ResourceError, match="in float32 but only"):
        load_model(folder, dtype="float32")
    load_model(folder, dtype="bfloat16")  # half of it fits


def test_quantize_q8_works_from_the_dequantized_weights(ragged):
    folder, _ = ragged
    full = np.asarray(load_model(folder, dtype="float32")([PROMPT]))
    q8 = np.asarray(load_model(folder, dtype="float32", quantize="q8")([PROMPT]))
    assert 0 < np.abs(q8 - full).max() < 0.05 * np.abs(full).max()


def test_moe_info_says_block_fp8(ragged):
    from moecli.cli.main import app

    folder, _ = ragged
    assert validate_checkpoint(folder).dtype.startswith("block-FP8 16x16 (float8_e4m3fn")
    result = CliRunner().invoke(app, ["info", str(folder), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "block-FP8 16x16" in result.stdout and "float32" in result.stdout


# ----------------------------------------------------------------------------- damaged checkpoints, refusals

GATE = "model.layers.0.mlp.experts.1.gate_proj.weight"


def drop_scale(state):
    del state[GATE + "_scale_inv"]
    return state


def misshape_scale(state):
    state[GATE + "_scale_inv"] = state[GATE + "_scale_inv"][:1].contiguous()   # [1, 3] for a [24, 40] weight
    return state


def float_weight_with_a_scale(state):
    state[GATE] = state[GATE].float()
    return state


@pytest.mark.parametrize("edit,words", [
    (drop_scale, [f"FP8 tensor {GATE} has no scale {GATE}_scale_inv", "re-download"]),
    (misshape_scale, [f"{GATE}_scale_inv is float32 [1, 3], expected float32 [2, 3]", "16x16 block", "[24, 40]"]),
    (float_weight_with_a_scale, [f"scale {GATE}_scale_inv belongs to no float8_e4m3fn tensor {GATE}"]),
], ids=["missing-scale", "misshapen-scale", "orphan-scale"])
def test_a_damaged_fp8_checkpoint_is_one_clear_line(ragged, tmp_path, edit, words):
    from moecli.cli.main import app

    damaged = copy_of(ragged[0], tmp_path, edit)
    for attempt in (lambda: load_model(damaged, dtype="float32"), lambda: validate_checkpoint(damaged)):
        with pytest.raises(CheckpointError) as err:
            attempt()
        line = err.value.one_line()
        assert "\n" not in line and all(w in line for w in words), line
    result = CliRunner().invoke(app, ["info", str(damaged)])  # the CLI: one `error:` line
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and words[0] in lines[0], result.stderr


def test_fp8_tensors_without_an_fp8_config_are_refused(ragged, tmp_path):
    def no_config(config):
        del config["quantization_config"]
        return config

    with pytest.raises(CheckpointError, match="is float8_e4m3fn: quantized checkpoints are not supported"):
        load_model(copy_of(ragged[0], tmp_path, config_edit=no_config), dtype="float32")


@pytest.mark.parametrize("change,words", [
    ({"weight_block_size": None}, "per-tensor FP8"),
    ({"weight_block_size": [128]}, "two positive integers"),
    ({"weight_block_size": [0, 128]}, "two positive integers"),
    ({"activation_scheme": "static"}, "static activation scales"),
    ({"fmt": "e5m2"}, "other than e4m3"),
    ({"expert_dtype": "fp4"}, "FP4 experts"),
], ids=str)
def test_fp8_variants_moecli_cannot_read_are_refused(change, words):
    qc = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128], **change}
    with pytest.raises(ConfigError, match=words) as err:
        fp8.parse_config({"quantization_config": qc})
    assert "\n" not in err.value.one_line()


def test_parse_config():
    assert fp8.parse_config({}) is None
    assert fp8.parse_config({"quantization_config": {"quant_method": "compressed-tensors"}}) is None
    scheme = fp8.parse_config({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 64],
                                                       "scale_fmt": "ue8m0", "modules_to_not_convert": None}})
    assert scheme.block == (128, 64) and scheme.label() == "block-FP8 128x64"
    minimax = {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
               "weight_block_size": [128, 128],
               "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}
    assert fp8.parse_config({"quantization_config": minimax}).block == (128, 128)


def test_fp8_multi_token_prediction_layers_are_skipped_as_stored(tmp_path):
    """DeepSeek-V3's MTP layer (model.layers.{n}.*, FP8 like the others) is passed over without being
    dequantized: the logits are those of the checkpoint without it, and the note counts its scales too."""
    hf = build("deepseek_v3", **DEEPSEEK)
    plain = tmp_path / "plain"
    fp8_checkpoint(hf, plain, (16, 16))
    state = load_file(plain / "model.safetensors")
    mtp = {k.replace("model.layers.2.", "model.layers.3."): v for k, v in state.items()
           if k.startswith("model.layers.2.")}
    mtp["model.layers.3.eh_proj.weight"], mtp["model.layers.3.eh_proj.weight_scale_inv"] = quantize(
        torch.randn(32, 64), (16, 16))
    assert sum(v.dtype == torch.float8_e4m3fn for v in mtp.values()) > 10
    with_mtp = copy_of(plain, tmp_path, lambda s: {**s, **mtp})
    model = load_model(with_mtp, dtype="float32")
    assert model.load_notes[0].startswith(f"not loaded: {len(mtp)} tensors of model.layers.3.*")
    np.testing.assert_array_equal(np.asarray(model([PROMPT])), np.asarray(load_model(plain, dtype="float32")([PROMPT])))
