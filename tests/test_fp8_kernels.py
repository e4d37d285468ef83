"""Block-FP8 experts kept packed (moecli/model/fp8.py): the pure-JAX reference against the loader's
dequantization, the packed CPU kernel (csrc/fp8.cc) against the reference on its AVX-512 and AVX2
paths (every e4m3 code but NaN, subnormals included, partial blocks, blocks no multiple of a vector),
and tiny block-FP8 checkpoints (tests/test_fp8.py's builders) loaded packed: the same logits as the
dequantized load and as transformers' float twin, the bytes they keep, the backend's kernel, --quantize,
and expert parallelism."""
from __future__ import annotations

import json
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hf_models import build, hf_greedy, hf_logits
from test_fp8 import PROMPT, float_twin, fp8_checkpoint, quantize as hub_quantize
from isa_runs import check_isa_case, isa_cases, needs_compiler
from test_quant_kernels import run_python
from moecli import generate_tokens, load_model
from moecli.checkpoints import fp8 as fp8_checkpoint_module, loader
from moecli.errors import ResourceError
from moecli.inference.engine import Model
from moecli.kernels.cpu import backend, ffi as cpu_kernels
from moecli.model import experts as E, fp8
from moecli.model.config import QuantConfig
from moecli.model.ops import XLA
from moecli.model.router import Routing
from moecli.model.sizes import weight_bytes


def random_fp8(rng, lead: tuple[int, ...], out: int, d_in: int, block: tuple[int, int]) -> fp8.FP8Weight:
    """Random codes (every byte but the NaNs 0x7f and 0xff: subnormals and zeros included) and block
    scales spanning 2^-4 .. 2^4, numpy arrays in moecli.model.fp8's layout."""
    codes = rng.integers(0, 256, (*lead, out, d_in), dtype=np.uint8)
    codes[(codes & 0x7f) == 0x7f] = 0x01   # the smallest subnormal instead
    grid = fp8.grid(out, d_in, block)
    return fp8.FP8Weight(codes, np.exp2(rng.uniform(-4, 4, (*lead, *grid))).astype(np.float32), block)


# --- the format -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape,block", [((3, 40, 24), (16, 16)), ((36, 20), (8, 12)), ((5, 7), (16, 16))], ids=str)
def test_dequantize_equals_the_loaders(shape, block):
    """The reference [..., in, out] is the loader's numpy dequantization [..., out, in], transposed, bit for bit."""
    rng = np.random.default_rng(sum(shape))
    w = random_fp8(rng, shape[:-2], *shape[-2:], block)
    w.weight.reshape(-1)[:254] = np.delete(np.arange(256, dtype=np.uint8), [0x7f, 0xff])[:w.weight.size]
    want = fp8_checkpoint_module.dequantize(w.weight.view(ml_dtypes.float8_e4m3fn), w.scale, block)
    got = np.asarray(fp8.dequantize(jax.tree.map(jnp.asarray, w)))
    np.testing.assert_array_equal(got, np.swapaxes(want, -1, -2))


def test_quantize_is_the_hubs():
    """fp8.quantize (a float tensor placed where FP8 is kept) rounds as the Hub's quantizer (test_fp8)."""
    w = torch.randn(2, 40, 24) * 3
    codes, scale = hub_quantize(w, (16, 8))
    ours = fp8.quantize(np.swapaxes(w.numpy(), -1, -2), (16, 8))      # [in, out] in, [out, in] codes
    np.testing.assert_array_equal(ours.weight, codes.view(torch.uint8).numpy())
    np.testing.assert_array_equal(ours.scale, scale.numpy())


def test_the_label_and_a_format_without_eight_bits():
    assert QuantConfig(experts=8, experts_format="fp8").label() == "experts fp8, dense float, lm_head float"
    with pytest.raises(Exception, match="fp8 with 8-bit"):
        QuantConfig(experts=4, experts_format="fp8").validate()


# --- the kernel ------------------------------------------------------------------------------------------

# (rows of x, k, outputs, experts, block): one row (decoding); tokens in chunks of 4 and a tail; outputs
# off every multiple of the rows done at once; partial last blocks both ways; a block of 12 inputs (no
# multiple of 8 or 16 lanes: scalar tails); fewer inputs than a vector; DeepSeek's 128x128.
MATVECS = {"a1-k64-n5-16x16": (1, 64, 5, 3, (16, 16)), "a7-k40-n37-16x16": (7, 40, 37, 4, (16, 16)),
           "a40-k256-n150-128x128": (40, 256, 150, 3, (128, 128)), "a3-k300-n70-32x12": (3, 300, 70, 2, (32, 12)),
           "a2-k7-n3-16x16": (2, 7, 3, 2, (16, 16)), "a5-k1000-n130-128x128": (5, 1000, 130, 2, (128, 128))}
EXPERTS = {"experts-t1": 1, "experts-t3": 3, "experts-t40": 40}  # SwiGLU, 6 experts of d 72, f 64, 16x16 blocks


def kernel_error(case: str) -> float:
    """The packed kernel against the dequantized reference: max |error| / max |reference|."""
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    if case in MATVECS:
        n, k, m, e, block = MATVECS[case]
        w = random_fp8(rng, (e,), m, k, block)
        x = rng.standard_normal((n, k)).astype(np.float32)
        ids = rng.integers(0, e, n).astype(np.int32)
        ids[rng.random(n) < 0.3] = rng.choice([-1, e])      # other devices' experts: rows of zeros
        ids[0] = 0
        got = np.asarray(jax.jit(cpu_kernels.expert_matvec_fp8, static_argnums=4)(x, ids, w.weight, w.scale, block))
        dense = np.asarray(fp8.dequantize(jax.tree.map(jnp.asarray, w))).astype(np.float64)
        want = np.stack([x[a] @ dense[i] if 0 <= i < e else np.zeros(m) for a, i in enumerate(ids)])
        assert not np.any(got[(ids < 0) | (ids >= e)])
    else:
        tokens, (e, d, f, k) = EXPERTS[case], (6, 72, 64, 3)
        ws = [jax.tree.map(jnp.asarray, random_fp8(rng, (e,), o, i, (16, 16))) for o, i in ((f, d), (f, d), (d, f))]
        ws = [fp8.FP8Weight(w.weight, w.scale * 1e-3, w.block) for w in ws]   # activations of order 1
        x = jnp.asarray(rng.standard_normal((tokens, d)).astype(np.float32))
        ids = rng.integers(0, e, (tokens, k)).astype(np.int32)
        ids[:, -1] = np.where(rng.random(tokens) < 0.5, e, ids[:, -1])    # "elsewhere" (sharded)
        routing = Routing(jnp.asarray(ids), jnp.asarray(rng.uniform(0, 1, (tokens, k)).astype(np.float32)), None)
        run = lambda fn: np.asarray(jax.jit(lambda x, r, *w: fn(x, *w, r, e))(x, routing, *ws))  # noqa: E731
        got, want = run(backend.experts_kernel_fp8), run(E.experts_dense)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


ISA_CASES = isa_cases([*MATVECS, *EXPERTS])


@pytest.mark.parametrize("isa,case", ISA_CASES)
def test_kernel_equals_reference(isa, case):
    check_isa_case("test_fp8_kernels", [*MATVECS, *EXPERTS], isa, case)


@needs_compiler
@pytest.mark.parametrize("scale,block,words", [
    ((3, 1, 2), (16, 16), "scale has 1x2 blocks a matrix, expected 1x3 for [8, 40] in blocks of 16x16"),
    ((2, 1, 3), (16, 16), "scale has shape [2, 1, 3], expected [3, r, c]"),
    ((3, 1, 3), (0, 16), "the block must be positive"),
], ids=["grid", "experts", "block"])
def test_a_wrong_buffer_is_an_error_not_a_crash(scale, block, words):
    if not cpu_kernels.available():
        pytest.skip(cpu_kernels.status())
    x, ids, weight = jnp.ones((2, 40)), jnp.zeros(2, jnp.int32), jnp.zeros((3, 8, 40), jnp.uint8)
    assert np.asarray(cpu_kernels.expert_matvec_fp8(x, ids, weight, jnp.ones((3, 1, 3)), (16, 16))).shape == (2, 8)
    with pytest.raises(Exception, match="moecli_expert_matvec_fp8: " + words.replace("[", r"\[")):
        jax.block_until_ready(cpu_kernels.expert_matvec_fp8(x, ids, weight, jnp.ones(scale), block))
    with pytest.raises(TypeError, match="moecli_expert_matvec_fp8: scale is float16, expected float32"):
        cpu_kernels.expert_matvec_fp8(x, ids, weight, jnp.ones((3, 1, 3), jnp.float16), (16, 16))


# --- whole models ----------------------------------------------------------------------------------------

# name: (family, overrides, block, fused): d_expert a multiple of the block rows (so the experts stay
# packed), d_model not (partial blocks: w_gate's inputs, w_down's outputs); transformers' fused
# gate_up stack split between two block rows, with a block of 12 inputs.
MODELS = {"qwen3-16x16": ("qwen3_moe", dict(hidden_size=40, num_experts=4, moe_intermediate_size=32, head_dim=16),
                          (16, 16), False),
          "mixtral-fused-8x12": ("mixtral", dict(num_local_experts=4), (8, 12), True)}


@pytest.fixture(scope="module", params=list(MODELS))
def checkpoint(request, tmp_path_factory):
    """(folder, transformers' float twin holding the reference dequantization, the packed model)."""
    family, overrides, block, fused = MODELS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    dequantized = fp8_checkpoint(build(family, **overrides), folder, block, fused=fused)
    twin = float_twin(folder, tmp_path_factory.mktemp(request.param + "-float"), dequantized)
    return folder, twin, load_model(folder, dtype="float32")


def test_the_experts_stay_packed_at_one_byte_a_weight(checkpoint):
    """Every expert matrix is its uint8 codes and float32 block scales (no float copy among the
    parameters), and the byte counts (memory check, `moe info`) say so."""
    model = checkpoint[2]
    c = model.config
    assert c.quant.experts_format == "fp8" and c.quant.experts == 8
    codes = scales = other = 0
    for module, group in model.params.items():
        for param, leaf in group.items():
            if module.endswith("/moe") and param.startswith(("w_gate", "w_up", "w_down")):
                assert (param.endswith("_e4m3") and leaf.dtype == jnp.uint8
                        or param.endswith("_scale_inv") and leaf.dtype == jnp.float32), (module, param)
                if param.endswith("_e4m3"):
                    codes += leaf.nbytes
                else:
                    scales += leaf.nbytes
            else:
                other += leaf.nbytes
    weights = sum(c.moe_layers) * c.n_experts * 3 * c.d_model * c.d_expert
    assert codes == weights and 0 < scales < weights
    assert weight_bytes(c, 4) == (other, codes + scales)
    assert weight_bytes(c, 2)[1] == codes + scales   # the packed bytes whatever the model's dtype


def test_the_memory_check_counts_the_packed_bytes(checkpoint, monkeypatch):
    folder, _, model = checkpoint
    needed = sum(weight_bytes(model.config, 4))
    floats = sum(weight_bytes(model.config.replace(quant=QuantConfig()), 4))
    assert needed < floats - weight_bytes(model.config, 4)[1]   # the experts: 1 byte a weight, not 4
    monkeypatch.setattr(loader, "available_memory", lambda: loader.FreeMemory(needed - 1, "in host memory", False))
    with pytest.raises(ResourceError, match="in experts fp8, dense float, lm_head float but only"):
        load_model(folder, dtype="float32")
    monkeypatch.setattr(loader, "available_memory", lambda: loader.FreeMemory(needed, "in host memory", False))
    load_model(folder, dtype="float32")   # fits, where the dequantized float32 model would not


def test_moe_info_places_the_packed_bytes(checkpoint):
    from moecli.cli.main import app

    result = CliRunner().invoke(app, ["info", str(checkpoint[0]), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "experts fp8" in result.stdout


@pytest.mark.parametrize("ops", ["backend", "xla"])
def test_logits_and_greedy_tokens_match_transformers(checkpoint, ops):
    """The CPU backend (the packed kernel) and the pure-JAX reference (dequantize, then multiply)
    against transformers' float model holding the same dequantized weights."""
    _, twin, packed = checkpoint
    model = packed if ops == "backend" else Model(packed.config, packed.params, ops=XLA)
    ids = np.array([PROMPT, PROMPT[::-1]])
    want = hf_logits(twin, ids).numpy()
    np.testing.assert_allclose(np.asarray(model(ids)), want, atol=1e-4, rtol=0)
    assert generate_tokens(model, PROMPT[:4], 16) == hf_greedy(twin, PROMPT[:4], 16)


def test_packed_equals_dequantized_on_load(checkpoint):
    """--quantize none dequantizes the experts as they load (float32 stacks) and computes the same."""
    folder, _, packed = checkpoint
    floats = load_model(folder, dtype="float32", quantize="none")
    assert floats.params["transformer/layer_0/moe"]["w_gate"].dtype == jnp.float32
    ids = np.array([PROMPT, PROMPT[::-1]])
    np.testing.assert_allclose(np.asarray(floats(ids)), np.asarray(packed(ids)), atol=1e-5, rtol=0)


def test_cached_decoding_equals_the_full_forward(checkpoint):
    packed = checkpoint[2]
    ids = np.array([PROMPT])
    cache = packed.init_cache(batch=1, max_len=32)
    logits, cache = packed.step(ids[:, :5], cache)
    steps = [np.asarray(logits)]
    for t in range(5, len(PROMPT)):
        logits, cache = packed.step(ids[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(packed(ids)), atol=1e-4, rtol=0)


@needs_compiler
def test_the_backend_runs_the_kernel(checkpoint):
    """The CPU backend's decode step calls the packed kernel (and no expert is dequantized in it)."""
    packed = checkpoint[2]
    if not cpu_kernels.available():
        pytest.skip(cpu_kernels.status())
    assert packed.ops.experts(1, 2, 4, fp8.DTYPE) is backend.experts_kernel_fp8
    cache = packed.init_cache(batch=1, max_len=16)
    text = packed._step.lower(packed.params, jnp.zeros((1, 1), jnp.int32), cache).as_text()
    assert text.count("moecli_expert_matvec_fp8") >= 3 * sum(packed.config.moe_layers)   # gate, up, down


def test_quantize_q8_dequantizes_the_fp8_experts_first(checkpoint):
    folder, _, packed = checkpoint
    q8 = load_model(folder, dtype="float32", quantize="q8")
    assert "w_gate_q" in q8.params["transformer/layer_0/moe"]
    ids = np.array([PROMPT])
    full = np.asarray(packed(ids))
    assert 0 < np.abs(np.asarray(q8(ids)) - full).max() < 0.05 * np.abs(full).max()


def test_a_float_stack_where_fp8_is_kept_is_rounded_like_the_hub(checkpoint):
    """A placer keeping FP8 experts given a float tensor (a checkpoint leaving one stack unquantized)
    stores its block-FP8 rounding rather than failing."""
    from moecli.checkpoints.placement import Placer
    from moecli.model.sizes import parameter_shapes

    c = checkpoint[2].config
    placer = Placer(parameter_shapes(c), np.float32, None, c.quant)
    w = np.random.default_rng(0).standard_normal((c.d_model, c.d_expert)).astype(np.float32)
    parts = {name: part for name, part, _ in placer.stored("transformer/layer_0/moe", "w_gate", w)}
    rounded = np.asarray(fp8.dequantize(fp8.FP8Weight(parts["w_gate_e4m3"], parts["w_gate_scale_inv"], c.quant.block)))
    assert 0 < np.abs(rounded - w).max() < 0.07 * np.abs(w).max()


def test_experts_split_over_devices(checkpoint):
    """Expert parallelism shards the codes and scales over the expert axis: 2 CPU devices give the one
    device's logits and greedy tokens."""
    folder = checkpoint[0]
    code = f"""if True:
        import json, numpy as np
        from moecli import generate_tokens, load_model
        out = {{}}
        for n in (1, 2):
            model = load_model({str(folder)!r}, dtype="float32", devices=n)
            moe = model.params["transformer/layer_0/moe"]
            out[n] = dict(logits=np.asarray(model(np.array([{PROMPT}]))).tolist(),
                          greedy=generate_tokens(model, {PROMPT[:4]}, 8),
                          shards=[s.data.shape[0] for p in ("w_gate_e4m3", "w_down_scale_inv")
                                  for s in moe[p].addressable_shards])
        print(json.dumps(out))
    """
    done = run_python(code, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    np.testing.assert_allclose(result["2"]["logits"], result["1"]["logits"], atol=1e-5, rtol=0)
    assert result["2"]["greedy"] == result["1"]["greedy"]
    assert result["2"]["shards"] == [2] * 4 and result["1"]["shards"] == [4] * 2
