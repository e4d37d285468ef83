"""MXFP4 experts (gpt-oss's format, moecli/model/mxfp4.py) kept packed: dequantization against
transformers' own (`convert_moe_packed_tensors`), E2M1 rounding, a tiny gpt-oss checkpoint stored
the way the Hub stores it loaded against transformers' dequantized model, the bytes it keeps (4.25
bits an expert weight), expert parallelism, and the packed CPU kernel (csrc/mxfp4.cc) against the
pure-JAX reference on its AVX-512 and AVX2 paths."""
from __future__ import annotations

import json
import types
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors

from hf_models import build, hf_greedy, hf_logits
from isa_runs import check_isa_case, isa_cases, needs_compiler
from test_quant_kernels import run_python
from moecli import generate_tokens, load_model
from moecli.checkpoints import mxfp4 as mxfp4_checkpoint
from moecli.errors import ConfigError
from moecli.inference.engine import Model
from moecli.kernels.cpu import backend, ffi as cpu_kernels
from moecli.model import experts as E, mxfp4
from moecli.model.config import QuantConfig
from moecli.model.ops import XLA
from moecli.model.router import Routing
from moecli.model.sizes import weight_bytes

TINY = 2.0 ** -126  # float32's smallest normal: XLA flushes what is below it to zero


def random_packed(rng, lead: tuple[int, ...], out: int, d_in: int, low: int = 100, high: int = 140):
    """Random MXFP4 arrays in moecli's layout: every code, scales 2^(low - 127) .. 2^(high - 128)."""
    blocks = rng.integers(0, 256, (*lead, out, d_in // 2), dtype=np.uint8)
    return mxfp4.MXFP4Weight(blocks, rng.integers(low, high, (*lead, out, d_in // 32), dtype=np.uint8))


def transformers_dequantized(w: mxfp4.MXFP4Weight) -> np.ndarray:
    """transformers' float32 [e, in, out] for our arrays, from the checkpoint's [e, out, in / 32, 16]."""
    blocks = torch.from_numpy(w.blocks.reshape(*w.blocks.shape[:-1], -1, 16))
    return convert_moe_packed_tensors(blocks, torch.from_numpy(w.scales), dtype=torch.float32).numpy()


# --- the format -------------------------------------------------------------------------------------------

def test_the_value_table_is_transformers():
    np.testing.assert_array_equal(mxfp4.FP4_VALUES, np.array(FP4_VALUES, np.float32))


def test_dequantize_equals_transformers():
    """Every code, every scale byte (0 and 1: subnormal, 254: near float32's top), low nibble first."""
    rng = np.random.default_rng(0)
    w = random_packed(rng, (3,), 24, 256)
    w.scales.reshape(-1)[:255] = np.arange(255, dtype=np.uint8)   # every byte but 255 (the spec's NaN)
    want = transformers_dequantized(w)
    got = np.asarray(mxfp4.dequantize(mxfp4.MXFP4Weight(jnp.asarray(w.blocks), jnp.asarray(w.scales))))
    assert got.shape == want.shape == (3, 256, 24)
    np.testing.assert_array_equal(got, np.where(np.abs(want) < TINY, 0, want))
    np.testing.assert_array_equal(mxfp4_checkpoint.dequantize(w), want)  # the loader's numpy one: exact
    assert np.abs(want).max() > 1e38 and 0 < np.abs(want[want != 0]).min() < TINY   # the range was covered


def test_quantize_rounds_to_the_nearest_e2m1_value():
    """Scale 2^(floor(log2 max|w|) - 2) a block, each weight the nearest of its 16 values (ties to the
    even code), values on the grid kept exactly."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2, 64, 8)).astype(np.float32) * np.exp2(rng.integers(-8, 8, (2, 1, 8)))
    w[0, :32, 0] = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0] * 4) * np.repeat([1, -1], 16)  # ties
    q = mxfp4.quantize(w)
    got = mxfp4_checkpoint.dequantize(q)                                             # [2, 64, 8]
    groups = np.swapaxes(w, -1, -2).reshape(2, 8, 2, 32)
    scale = np.exp2(np.floor(np.log2(np.abs(groups).max(-1))) - 2)                    # [2, 8, 2]
    np.testing.assert_array_equal(q.scales.astype(np.int32) - 127, np.log2(scale).astype(np.int32))
    candidates = mxfp4.FP4_VALUES[None, None, None, None, :] * scale[..., None, None]  # [2, 8, 2, 1, 16]
    best = np.abs(groups[..., None] - candidates).min(-1)
    chosen = np.swapaxes(got, -1, -2).reshape(2, 8, 2, 32)
    np.testing.assert_array_equal(np.abs(groups - chosen), best)
    ties = np.swapaxes(got, -1, -2)[0, 0, :32] / scale[0, 0, 0]
    np.testing.assert_array_equal(np.abs(ties), [0, 1, 1, 2, 2, 4, 4, 6] * 4)
    again = mxfp4.quantize(got)
    assert np.array_equal(again.blocks, q.blocks) and np.array_equal(again.scales, q.scales)


def test_the_label_and_a_format_without_four_bits():
    assert QuantConfig(experts=4, experts_format="mxfp4").label() == "experts mxfp4, dense float, lm_head float"
    with pytest.raises(ConfigError, match="mxfp4 with 4-bit experts"):
        QuantConfig(experts=8, experts_format="mxfp4").validate()


def test_only_gpt_oss_has_mxfp4_checkpoints():
    with pytest.raises(ConfigError, match="MXFP4 checkpoints of 'mixtral' models are not supported"):
        mxfp4_checkpoint.parse_config({"model_type": "mixtral", "quantization_config": {"quant_method": "mxfp4"}})


# --- a tiny gpt-oss checkpoint as the Hub stores it ----------------------------------------------------------

CONFIG = dict(hidden_size=64, intermediate_size=64, head_dim=16, num_local_experts=4, swiglu_limit=1.0)
PROMPT = [1, 5, 9, 33, 7, 64, 2, 100, 17, 3, 90, 41]
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def save_mxfp4(hf, folder):
    """`hf` saved, then its experts rounded to MXFP4 and stored as openai/gpt-oss-* stores them:
    `{gate_up,down}_proj_blocks` uint8 [e, out, in / 32, 16] and `_scales` uint8 [e, out, in / 32]."""
    hf.save_pretrained(folder)
    tensors = {}
    for name, t in load_file(folder / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):   # [e, in, out]
            w = mxfp4.quantize(t.numpy())
            tensors[f"{name}_blocks"] = torch.from_numpy(w.blocks.reshape(*w.blocks.shape[:-1], -1, 16))
            tensors[f"{name}_scales"] = torch.from_numpy(w.scales)
        else:
            tensors[name] = t
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(the float model, transformers' dequantized load of its MXFP4 checkpoint, the folder)."""
    hf = build("gpt_oss", **CONFIG)
    folder = save_mxfp4(hf, tmp_path_factory.mktemp("gpt-oss-mxfp4"))
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
    assert reference.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32   # dequantized
    return hf, reference, folder


@pytest.fixture(scope="module")
def packed(checkpoint):
    def no_float_copy(*_):
        raise AssertionError("the MXFP4 experts were dequantized on the host while loading")

    with pytest.MonkeyPatch.context() as patch:   # the loader's only way to a float expert
        patch.setattr(mxfp4_checkpoint, "dequantize", no_float_copy)
        return load_model(checkpoint[2], dtype="float32")


def test_mxfp4_changes_the_model_and_routing_is_decisive(checkpoint):
    """The rounding moves the logits far past the tolerance below (so a loader that read other weights,
    or the float ones, fails), and the dequantized model's top-k never nearly ties."""
    hf, reference, _ = checkpoint
    ids = np.array([PROMPT])
    assert float((hf_logits(hf, ids) - hf_logits(reference, ids)).abs().max()) > 0.05
    with torch.no_grad():
        out = reference(torch.as_tensor(ids), output_router_logits=True)
    for logits in out.router_logits:
        top = logits.topk(3, dim=-1).values
        assert float((top[:, 1] - top[:, 2]).min()) > 1e-3


@pytest.mark.parametrize("ops", ["backend", "xla"])
def test_logits_and_greedy_tokens_match_transformers(checkpoint, packed, ops):
    """The CPU backend (the packed kernel) and the pure-JAX reference (dequantize, then multiply)."""
    _, reference, _ = checkpoint
    model = packed if ops == "backend" else Model(packed.config, packed.params, ops=XLA)
    ids = np.array([PROMPT, PROMPT[::-1]])
    want = hf_logits(reference, ids).numpy()
    got = np.asarray(model(ids))
    assert float(np.abs(got - want).max() / np.abs(want).max()) <= 1e-3
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)   # as close as the float parity tests
    assert generate_tokens(model, PROMPT[:4], 16) == hf_greedy(reference, PROMPT[:4], 16)


def test_cached_decoding_equals_the_full_forward(packed):
    ids = np.array([PROMPT])
    cache = packed.init_cache(batch=1, max_len=32)
    logits, cache = packed.step(ids[:, :5], cache)
    steps = [np.asarray(logits)]
    for t in range(5, len(PROMPT)):
        logits, cache = packed.step(ids[:, t:t + 1], cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(packed(ids)), atol=1e-4, rtol=0)


def test_the_experts_stay_packed_at_4_25_bits_a_weight(packed):
    """Every expert matrix is its uint8 blocks and scales (no float copy among the parameters), 4.25
    bits a weight, and the byte counts (memory check, `moe info`) say so."""
    c = packed.config
    assert c.quant == QuantConfig(experts=4, experts_format="mxfp4")
    expert_bytes = other_bytes = 0
    for module, group in packed.params.items():
        for param, leaf in group.items():
            if module.endswith("/moe") and param.startswith(("w_gate", "w_up", "w_down")):
                assert param.endswith(("_blocks", "_scales")) and leaf.dtype == jnp.uint8, (module, param)
                expert_bytes += leaf.nbytes
            else:
                other_bytes += leaf.nbytes
    weights = c.n_layers * c.n_experts * 3 * c.d_model * c.d_expert
    assert expert_bytes * 8 / weights == 4.25
    replicated, split = weight_bytes(c, 4)
    assert replicated + split == expert_bytes + other_bytes


def test_packed_is_faithful_where_dequantized_on_load(checkpoint, packed):
    """--quantize none dequantizes the experts as they load (float32 stacks) and computes the same."""
    floats = load_model(checkpoint[2], dtype="float32", quantize="none")
    assert floats.params["transformer/layer_0/moe"]["w_gate"].dtype == jnp.float32
    ids = np.array([PROMPT])
    np.testing.assert_allclose(np.asarray(floats(ids)), np.asarray(packed(ids)), atol=1e-5, rtol=0)


def test_experts_split_over_devices(checkpoint):
    """Expert parallelism shards the blocks and scales over the expert axis: 2 CPU devices give the one
    device's logits and greedy tokens. (More devices split the same arrays by the same rule: test_sharding.py.)"""
    code = f"""if True:
        import json, jax, numpy as np
        from moecli import generate_tokens, load_model
        out = {{}}
        for n in (1, 2):
            model = load_model({str(checkpoint[2])!r}, dtype="float32", devices=n)
            moe = model.params["transformer/layer_0/moe"]
            out[n] = dict(logits=np.asarray(model(np.array([{PROMPT}]))).tolist(),
                          greedy=generate_tokens(model, {PROMPT[:4]}, 8),
                          shards=[list(s.data.shape) for p in ("w_gate_blocks", "w_down_scales")
                                  for s in moe[p].addressable_shards])
        print(json.dumps(out))
    """
    done = run_python(code, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    np.testing.assert_allclose(result["2"]["logits"], result["1"]["logits"], atol=1e-5, rtol=0)
    assert result["2"]["greedy"] == result["1"]["greedy"]
    assert result["2"]["shards"] == [[2, 64, 32]] * 2 + [[2, 64, 2]] * 2


# --- the kernel ------------------------------------------------------------------------------------------------

# (rows of x, k, outputs, experts): one row (decoding), several tokens on one expert (chunks of 4 and
# a tail), outputs off every multiple of the rows done at once, one block, gpt-oss's 2880 inputs.
MATVECS = {"a1-k64-n5": (1, 64, 5, 3), "a4-k96-n37": (4, 96, 37, 6), "a40-k128-n150": (40, 128, 150, 6),
           "a7-k32-n1": (7, 32, 1, 2), "a3-k2880-n64": (3, 2880, 64, 2)}
EXPERTS = {"experts-t1": 1, "experts-t3": 3, "experts-t40": 40}  # gpt-oss's FFN, 6 experts of d 96, f 64


def kernel_error(case: str) -> float:
    """The packed kernel against the dequantized reference: max |error| / max |reference|."""
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    if case in MATVECS:
        n, k, m, e = MATVECS[case]
        w = random_packed(rng, (e,), m, k)
        x = rng.standard_normal((n, k)).astype(np.float32)
        ids = rng.integers(0, e, n).astype(np.int32)
        ids[rng.random(n) < 0.3] = rng.choice([-1, e])      # other devices' experts: rows of zeros
        ids[0] = 0
        got = np.asarray(jax.jit(cpu_kernels.expert_matvec_mxfp4)(x, ids, w.blocks, w.scales))
        dense = mxfp4_checkpoint.dequantize(w).astype(np.float64)
        want = np.stack([x[a] @ dense[i] if 0 <= i < e else np.zeros(m) for a, i in enumerate(ids)])
    else:
        tokens, (e, d, f, k) = EXPERTS[case], (6, 96, 64, 3)
        ws = [jax.tree.map(jnp.asarray, random_packed(rng, (e,), o, i, 117, 123)) for o, i in ((f, d), (f, d), (d, f))]
        biases = tuple(jnp.asarray(rng.standard_normal((e, n)).astype(np.float32)) for n in (f, f, d))
        x = jnp.asarray(rng.standard_normal((tokens, d)).astype(np.float32))
        ids = rng.integers(0, e, (tokens, k)).astype(np.int32)
        ids[:, -1] = np.where(rng.random(tokens) < 0.5, e, ids[:, -1])    # "elsewhere" (sharded)
        routing = Routing(jnp.asarray(ids), jnp.asarray(rng.uniform(0, 1, (tokens, k)).astype(np.float32)), None)
        glu = E.GLUS["clamped_swiglu"](types.SimpleNamespace(swiglu_limit=1.0, swiglu_alpha=1.702))
        run = lambda fn: np.asarray(jax.jit(lambda x, r, *w: fn(x, *w, r, e, glu=glu, biases=biases))(  # noqa: E731
            x, routing, *ws))
        got, want = run(backend.experts_kernel_mxfp4), run(E.experts_dense)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


ISA_CASES = isa_cases([*MATVECS, *EXPERTS])


@pytest.mark.parametrize("isa,case", ISA_CASES)
def test_kernel_equals_reference(isa, case):
    check_isa_case("test_mxfp4", [*MATVECS, *EXPERTS], isa, case)


@needs_compiler
def test_the_backend_runs_the_kernel(packed):
    """The CPU backend's decode step calls the packed kernel (and no expert is dequantized in it)."""
    if not cpu_kernels.available():
        pytest.skip(cpu_kernels.status())
    assert packed.ops.gated_experts(1, 2, 4, mxfp4.DTYPE) is backend.experts_kernel_mxfp4
    cache = packed.init_cache(batch=1, max_len=16)
    text = packed._step.lower(packed.params, jnp.zeros((1, 1), jnp.int32), cache).as_text()
    assert text.count("moecli_expert_matvec_mxfp4") >= 3   # gate, up and down


@needs_compiler
@pytest.mark.parametrize("x,blocks,scales,words", [
    ((2, 48), (3, 8, 24), (3, 8, 1), "x has 48 columns"),
    ((2, 64), (3, 8, 32), (3, 8, 3), "x has 64 columns, blocks 32 bytes a row and scales 3 a row"),
    ((2, 64), (3, 8, 32), (3, 7, 2), "scales has shape [3, 7, 2], expected [3, 8, g]"),
])
def test_a_wrong_buffer_is_an_error_not_a_crash(x, blocks, scales, words):
    if not cpu_kernels.available():
        pytest.skip(cpu_kernels.status())
    with pytest.raises(Exception, match="moecli_expert_matvec_mxfp4: " + words.replace("[", r"\[")):
        jax.block_until_ready(cpu_kernels.expert_matvec_mxfp4(
            jnp.ones(x), jnp.zeros(x[:1], jnp.int32), jnp.zeros(blocks, jnp.uint8), jnp.zeros(scales, jnp.uint8)))
    with pytest.raises(TypeError, match="moecli_expert_matvec_mxfp4: scales is int8, expected uint8"):
        cpu_kernels.expert_matvec_mxfp4(jnp.ones((2, 64)), jnp.zeros(2, jnp.int32), jnp.zeros((3, 8, 32), jnp.uint8),
                                        jnp.zeros((3, 8, 2), jnp.int8))
