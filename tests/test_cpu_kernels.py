"""The hand-written CPU kernels (moecli/kernels/cpu/csrc) against the pure-JAX paths, and what they refuse."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moecli.kernels.cpu import ffi as cpu_kernels
from moecli.kernels.cpu.backend import cpu_ops
from moecli.model.config import ModelConfig
from moecli.model.ops import XLA
from moecli.model.router import route
from moecli.model.transformer import init_cache, transformed

# Only a machine without any C++ compiler skips: with one (CI), a build that fails must fail
# test_kernels_build below, not skip every test in silence.
COMPILER = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(not COMPILER, reason="no C++ compiler: the CPU kernels cannot be built")
F32, BF16, F16, I32 = jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32


def run_python(code: str, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (with this folder on the path): a crash or a hang there fails
    the test instead of taking pytest down, and environment variables apply from the start."""
    try:
        return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {timeout} s")


def test_kernels_build():
    assert cpu_kernels.available(), cpu_kernels.status()


# Calls with a wrong buffer. The kernels read raw memory: before they checked their operands,
# float16 weights were read as float32 (twice their size: a segfault), a narrow matrix past its end.
# Each target's operands (name: shape, all fitting together) and its result's shape:
EXPERTS = {"x": (2, 32), "expert_ids": (2, 2), "gate_weights": (2, 2), "w_gate": (4, 32, 48), "w_up": (4, 32, 48),
           "w_down": (4, 48, 32)}
GROUPED = {**EXPERTS, "x": (12, 32), "expert_ids": (12, 2), "gate_weights": (12, 2)}  # > 8 tokens
PRODUCT = {"x": (3, 32), "w": (32, 48)}
ATTENTION = {"q": (1, 2, 2, 3, 16), "k": (1, 2, 16, 40), "v": (1, 2, 40, 16), "start": ()}
TARGETS = {"moecli_experts": (EXPERTS, (2, 32)), "moecli_grouped_experts": (GROUPED, (12, 32)),
           "moecli_matvec": (PRODUCT, (3, 48)), "moecli_matmul": (PRODUCT, (3, 48)),
           "moecli_attention": (ATTENTION, (1, 2, 2, 3, 16))}
WRAPPERS = ("experts", "matvec", "matmul", "attention")  # ffi.py's, on moecli_<name>'s operands
F16_WEIGHTS = {"w_gate": F16, "w_up": F16, "w_down": F16}
BAD_CALLS = {  # case: (target, dtypes, shapes that differ from the above, what the error must say)
    "experts: float16 weights": ("moecli_experts", F16_WEIGHTS, {}, "w_gate is float16, expected float32 or bfloat16"),
    "experts: float16 x": ("moecli_experts", {"x": F16}, {}, "x is float16, expected float32"),
    "experts: float32 ids": ("moecli_experts", {"expert_ids": F32}, {}, "expert_ids is float32, expected int32"),
    "experts: mixed weights": ("moecli_experts", {"w_down": BF16}, {}, "w_down is bfloat16, expected float32"),
    "experts: w_down narrower than x": ("moecli_experts", {}, {"w_down": (4, 48, 31)},
                                        "w_down has shape [4, 48, 31], expected [4, 48, 32]"),
    "experts: float16 result": ("moecli_experts", {"y": F16}, {}, "y is float16, expected float32"),
    "grouped: float16 weights": ("moecli_grouped_experts", F16_WEIGHTS, {}, "w_gate is float16, expected float32 or bfloat16"),
    "grouped: float16 x": ("moecli_grouped_experts", {"x": F16}, {}, "x is float16, expected float32"),
    "grouped: fewer gate weights than ids": ("moecli_grouped_experts", {}, {"gate_weights": (12, 1)},
                                             "gate_weights has shape [12, 1], expected [12, 2]"),
    "matvec: float16 w": ("moecli_matvec", {"w": F16}, {}, "w is float16, expected float32 or bfloat16"),
    "matvec: float16 x": ("moecli_matvec", {"x": F16}, {}, "x is float16, expected float32"),
    "matvec: w shorter than x is wide": ("moecli_matvec", {}, {"w": (31, 48)}, "w has shape [31, 48], expected [32, n]"),
    "matvec: a result too wide": ("moecli_matvec", {}, {"y": (3, 64)}, "y has shape [3, 64], expected [3, 48]"),
    "matmul: float16 w": ("moecli_matmul", {"w": F16}, {}, "w is float16, expected float32 or bfloat16"),
    "matmul: float16 x": ("moecli_matmul", {"x": F16}, {}, "x is float16, expected float32"),
    "matmul: w of rank 3": ("moecli_matmul", {}, {"w": (32, 48, 1)}, "w has shape [32, 48, 1], expected [32, n]"),
    "attention: float16 q": ("moecli_attention", {"q": F16}, {}, "q is float16, expected float32"),
    "attention: float16 k": ("moecli_attention", {"k": F16}, {}, "k is float16, expected float32"),
    "attention: float32 start": ("moecli_attention", {"start": F32}, {}, "start is float32, expected int32"),
    "attention: fewer values than keys": ("moecli_attention", {}, {"v": (1, 2, 39, 16)},
                                          "v has shape [1, 2, 39, 16], expected [1, 2, 40, 16]"),
    # moecli/kernels/cpu/ffi.py's wrappers refuse while tracing (the CPU backend sends float16 to XLA):
    "ffi.experts: float16 weights": ("experts", F16_WEIGHTS, {}, "TypeError: moecli_experts: w_gate is float16"),
    "ffi.experts: mixed weights": ("experts", {"w_up": BF16}, {}, "TypeError: moecli_experts: w_up is bfloat16"),
    "ffi.matmul: float16 w": ("matmul", {"w": F16}, {}, "TypeError: moecli_matmul: w is float16"),
    "ffi.matvec: float16 w": ("matvec", {"w": F16}, {}, "TypeError: moecli_matvec: w is float16"),
    "ffi.attention: int32 q": ("attention", {"q": I32}, {}, "TypeError: moecli_attention: q is int32"),
}


def bad_call(target: str, dtypes: dict, shapes: dict):
    """`target` (an FFI target, called directly past ffi.py's checks, or one of ffi.py's wrappers)
    on TARGETS' operands, with `dtypes` and `shapes` changed ("y": the result's)."""
    wrapper = target in WRAPPERS
    operand_shapes, result_shape = TARGETS["moecli_" + target if wrapper else target]
    operands = [jnp.ones(shapes.get(name, shape), dtypes.get(name, I32 if name in ("expert_ids", "start") else F32))
                for name, shape in operand_shapes.items()]
    if wrapper:
        return getattr(cpu_kernels, target)(*operands, *([None] if target == "attention" else []))
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shapes.get("y", result_shape), dtypes.get("y", F32)))
    return call(*operands, **({"window": np.int64(0)} if target == "moecli_attention" else {}))


@pytest.fixture(scope="module")
def bad_call_errors():
    """Every BAD_CALLS case, in one subprocess: {case: "ExceptionType: message", or None if it ran},
    the case it started last, and how the process ended (a crash stops it there)."""
    code = """if True:
        import json, jax
        from test_cpu_kernels import BAD_CALLS, bad_call, cpu_kernels
        assert cpu_kernels.available(), cpu_kernels.status()
        for case, (target, dtypes, shapes, _) in BAD_CALLS.items():
            print(json.dumps(["started", case]), flush=True)
            try:
                jax.block_until_ready(bad_call(target, dtypes, shapes))
                error = None
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            print(json.dumps(["done", case, error]), flush=True)
    """
    out = run_python(code)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    errors = {line[1]: line[2] for line in lines if line[0] == "done"}
    return errors, (lines[-1][1] if lines else None), out


@pytest.mark.parametrize("case", BAD_CALLS)
def test_a_wrong_buffer_is_an_error_not_a_crash(case, bad_call_errors):
    errors, last, out = bad_call_errors
    assert case in errors, f"the process ended (exit {out.returncode}) in {last!r}: {out.stderr[-2000:]}"
    target, _, _, words = BAD_CALLS[case]
    assert errors[case] is not None, f"{case}: the kernel ran"
    assert (words if words.startswith("TypeError") else f"{target}: {words}") in errors[case]


def upcast(*arrays):
    return [a.astype(jnp.float32) for a in arrays]


def experts_reference(x, w_gate, w_up, w_down, routing, n_experts, bf16_activations=False):
    """experts_dense in float32; with bf16_activations, rounding the inputs and the hidden
    activations to bfloat16 first, as the AMX and AVX512-BF16 engines do."""
    r = (lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)) if bf16_activations else (lambda a: a)
    w_gate, w_up, w_down = upcast(w_gate, w_up, w_down)
    hidden = jax.nn.silu(jnp.einsum("td,edf->tef", r(x), w_gate)) * jnp.einsum("td,edf->tef", r(x), w_up)
    y = jnp.einsum("tef,efd->ted", r(hidden), w_down)
    combine = jnp.sum(jax.nn.one_hot(routing.experts, n_experts) * routing.weights[..., None], axis=-2)
    return jnp.einsum("te,ted->td", combine, y)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens,d,f", [(1, 20, 36), (3, 20, 36), (40, 20, 36), (100, 300, 140), (30, 600, 530)])
def test_experts_kernel_equals_dense_reference(tokens, d, f, dtype):
    """Up to 8 tokens: the decoding kernel; more: the grouped one. Sizes off every block size
    (4, 16, 32, 128, 256, 512), so every loop's tail runs; 300 spans two blocks of depth, 530 and
    600 two of the grouped kernel's 512-column work items."""
    n_experts, top_k = 6, 3
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.PRNGKey(tokens), 5)
    x = jax.random.normal(k1, (tokens, d))
    w_gate, w_up = ((jax.random.normal(k, (n_experts, d, f)) * 2 / d ** 0.5).astype(dtype) for k in (k2, k3))
    w_down = (jax.random.normal(k4, (n_experts, f, d)) * 2 / f ** 0.5).astype(dtype)
    routing = route(x[None], jax.random.normal(k5, (d, n_experts)), top_k, True)
    flat = type(routing)(*(t[0] for t in routing))
    rounded = dtype == jnp.bfloat16 and tokens > cpu_kernels.DECODE_ROWS and cpu_kernels.bf16_engine() != "float32"
    tolerance = {"rtol": 1e-3, "atol": 1e-2} if rounded else {"rtol": 1e-4, "atol": 1e-3}
    want = experts_reference(x, w_gate, w_up, w_down, flat, n_experts, rounded)
    got = jax.jit(cpu_kernels.experts)(x, flat.experts, flat.weights, w_gate, w_up, w_down)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **tolerance)
    # Ids outside [0, n_experts) are another device's experts: skipped.
    n_local = 4
    here = flat.experts < n_local
    local = flat._replace(experts=jnp.where(here, flat.experts, n_local), weights=jnp.where(here, flat.weights, 0.0))
    want = experts_reference(x, w_gate, w_up, w_down, local._replace(experts=jnp.minimum(local.experts, 5)), 6, rounded)
    got = cpu_kernels.experts(x, local.experts, local.weights, w_gate[:n_local], w_up[:n_local], w_down[:n_local])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **tolerance)


@pytest.mark.parametrize("cap", cpu_kernels.BF16_ENGINES)
def test_every_bfloat16_prompt_engine_equals_its_reference(cap):
    """MOECLI_CPU_BF16=cap: the best engine for bfloat16 weights at or below `cap` that the CPU
    has (never one above it) multiplies a prompt's experts and dense products. AMX and
    AVX512-BF16 round the activations to bfloat16; the float32 engine widens the weights instead
    and rounds nothing. Sizes off every block: odd depths (pairs), 300 > one 256-row block."""
    code = """if True:
        import jax, jax.numpy as jnp, numpy as np
        from moecli.kernels.cpu import ffi as cpu_kernels
        from test_cpu_kernels import experts_reference, route
        rounded = cpu_kernels.bf16_engine() != "float32"
        r = (lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)) if rounded else (lambda a: a)
        ks = jax.random.split(jax.random.PRNGKey(0), 6)
        x = jax.random.normal(ks[0], (50, 41))
        w_gate, w_up = ((jax.random.normal(k, (4, 41, 70)) / 6).astype(jnp.bfloat16) for k in ks[1:3])
        w_down = (jax.random.normal(ks[3], (4, 70, 41)) / 8).astype(jnp.bfloat16)
        routing = route(x[None], jax.random.normal(ks[4], (41, 4)), 2, True)
        flat = type(routing)(*(t[0] for t in routing))
        got = cpu_kernels.experts(x, flat.experts, flat.weights, w_gate, w_up, w_down)
        want = experts_reference(x, w_gate, w_up, w_down, flat, 4, rounded)
        errors = [float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))]
        for rows, k, n in [(9, 20, 36), (300, 301, 130), (13, 33, 17)]:
            xm = jax.random.normal(ks[5], (rows, k))
            w = jax.random.normal(ks[4], (k, n)).astype(jnp.bfloat16)
            want = r(xm) @ w.astype(jnp.float32)
            errors.append(float(jnp.max(jnp.abs(jax.jit(cpu_kernels.matmul)(xm, w) - want)) / jnp.max(jnp.abs(want))))
        print(cpu_kernels.bf16_engine(), max(errors))
    """
    out = run_python(code, MOECLI_CPU_BF16=cap)
    assert out.returncode == 0, out.stderr
    engine, error = out.stdout.split()
    best = cpu_kernels.BF16_ENGINES.index(cpu_kernels.bf16_engine())  # this process: no cap
    assert cpu_kernels.BF16_ENGINES.index(engine) == max(best, cpu_kernels.BF16_ENGINES.index(cap))
    assert float(error) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows,k,n", [(1, 7, 5), (1, 1024, 3000), (3, 64, 48), (8, 1037, 70), (5, 33, 17), (2, 300, 96)])
def test_matvec_equals_matmul(rows, k, n, dtype):
    """Rows in groups of up to four, rows of w sixteen stretches at a time, and every leftover:
    rows past the stretches, columns past a multiple of 16 (float32) or 32 (bfloat16, a 64-byte
    line at a time), a block split left empty."""
    x = jax.random.normal(jax.random.PRNGKey(0), (rows, k))
    w = jax.random.normal(jax.random.PRNGKey(1), (k, n)).astype(dtype)
    got = jax.jit(cpu_kernels.matvec)(x, w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x @ w.astype(jnp.float32)), rtol=1e-4, atol=1e-3)


TINY = ModelConfig(family="mixtral", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   head_dim=8, d_ff=0, d_expert=48, n_experts=4, top_k=2, moe_layers=(True, True))
PROMPT = jnp.array([[5, 9, 17, 3, 8, 60, 2, 33, 41, 7, 12, 50]])  # > 8 tokens: the grouped kernel


def tiny_params(dtype):
    params = transformed(TINY).init(jax.random.PRNGKey(0), PROMPT)
    return jax.tree_util.tree_map(lambda p: (p * 4).astype(dtype), params)  # decisive routing


def prefill_and_decode(params, ops) -> list[np.ndarray]:
    """The logits and experts chosen of a prefill of PROMPT and one decoding step, computed by `ops`."""
    model = transformed(TINY, ops=ops)
    cache = init_cache(TINY, 1, 16, jnp.float32, ops.keys_transposed)
    prefill, cache, first = jax.jit(model.apply)(params, PROMPT, cache)
    logits, _, routing = jax.jit(model.apply)(params, jnp.array([[11]]), cache)
    return [np.asarray(prefill, np.float32), np.asarray(first.experts),
            np.asarray(logits, np.float32), np.asarray(routing.experts)]


def assert_same_outputs(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for g, w in zip(got, want, strict=True):
        if w.dtype == np.int32:  # the experts chosen
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, atol=0.03 * np.abs(w).max(), rtol=0)


def test_bfloat16_decode_with_and_without_kernels():
    """A prefill and a decode step of a bf16 model: the CPU kernels vs plain XLA (bf16 rounding apart)."""
    ops = cpu_ops()
    assert ops.name == "cpu-kernels", ops.notes
    params = tiny_params(BF16)
    assert_same_outputs(prefill_and_decode(params, ops), prefill_and_decode(params, XLA))


def test_float16_model_on_cpu_runs_and_equals_xla():
    """`moe generate --dtype float16` on a CPU: the kernels read only float32 and bfloat16, so a
    float16 model must take XLA's paths, not crash (it once read float16 weights as float32: a
    segfault). In a subprocess, so that a crash fails this test rather than ending pytest."""
    code = """if True:
        import jax.numpy as jnp
        from test_cpu_kernels import F16, XLA, assert_same_outputs, cpu_ops, prefill_and_decode, tiny_params
        params = tiny_params(F16)
        assert_same_outputs(prefill_and_decode(params, cpu_ops()), prefill_and_decode(params, XLA))
        print("same")
    """
    out = run_python(code)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-3000:]}"
    assert out.stdout.split() == ["same"]


def test_a_bad_bf16_cap_is_one_clear_error():
    code = """if True:
        from moecli.errors import UsageError
        from moecli.kernels.cpu import ffi
        try:
            ffi.available()
        except UsageError as err:
            print(err.one_line())
    """
    out = run_python(code, MOECLI_CPU_BF16="fastest")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [
        "MOECLI_CPU_BF16='fastest' is not an engine for bfloat16 prompts — choose amx, dpbf16 or float32, or unset it"]


def test_the_bf16_cap_cannot_change_once_the_engine_is_chosen():
    """MoecliSetBf16Cap applies before the first bfloat16 product only: later, a different cap is
    refused (-1), not silently ignored."""
    chosen = cpu_kernels.BF16_ENGINES.index(cpu_kernels.bf16_engine())
    other = (chosen + 1) % len(cpu_kernels.BF16_ENGINES)
    assert cpu_kernels._library.MoecliSetBf16Cap(other) == -1
    assert cpu_kernels._library.MoecliSetBf16Cap(7) == -1
    assert cpu_kernels.bf16_engine() == cpu_kernels.BF16_ENGINES[chosen]


def kernels_status_in_subprocess(**env) -> str:
    code = "from moecli.kernels.cpu import ffi; print(ffi.available(), ffi.status())"
    out = run_python(code, **env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_switched_off_by_environment():
    assert kernels_status_in_subprocess(MOECLI_CPU_KERNELS="0") == \
        "False CPU kernels: off (turned off by MOECLI_CPU_KERNELS=0)"


def test_failed_build_falls_back(tmp_path):
    status = kernels_status_in_subprocess(MOECLI_CACHE=str(tmp_path), CXX="false")
    assert status.startswith("False CPU kernels: off (building the CPU kernels failed")
    assert not list((tmp_path / "kernels").glob("*.so"))  # no half-built library left behind


@pytest.mark.parametrize("group,t,length,start,window,head_dim", [
    (2, 1, 40, 17, None, 8),      # one decoding token: keys 0..17 of a longer cache
    (1, 70, 70, 0, None, 20),     # a prompt, no cache: head_dim off the vector width, 2 key blocks
    (4, 37, 150, 100, None, 64),  # a chunk after a filled prefix; the query blocks' tail
    (2, 30, 64, 10, 7, 16),       # sliding window
    (3, 41, 100, 0, None, 128),   # 3 heads a kv head: steps of six rows mix positions; head_dim 128
    # up to 8 positions (decoding) take the chunked path, 1024 keys a chunk:
    (2, 1, 3000, 2500, None, 64),  # three chunks, the last one partly filled
    (2, 8, 1100, 1020, None, 64),  # queries whose keys all lie in the first chunk
    (4, 5, 1100, 1030, None, 128),
    (2, 3, 2100, 2050, 1030, 20),  # sliding window: keys masked at a chunk's start; head_dim off the vector width
])
def test_attention_kernel_equals_xla(group, t, length, start, window, head_dim):
    # plain XLA's keys are [b, kv, len, d]; the kernel's are transposed
    from moecli.model.ops import attend_xla

    kq, kk, kv = jax.random.split(jax.random.PRNGKey(t), 3)
    q = jax.random.normal(kq, (1, 3, group, t, head_dim)) * 2  # peaked softmax: errors would show
    k = jax.random.normal(kk, (1, 3, head_dim, length))
    v = jax.random.normal(kv, (1, 3, length, head_dim))
    positions = start + jnp.arange(t)
    want = attend_xla(q, jnp.swapaxes(k, -1, -2), v, positions, window)
    got = jax.jit(cpu_kernels.attention, static_argnums=4)(q / head_dim ** 0.5, k, v, positions[0], window)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_gradients_through_the_kernels_are_the_reference_ones():
    """Differentiating the model built on the CPU kernels: their custom VJP uses the pure-JAX paths."""
    ids = jnp.arange(12)[None] % 64
    params = transformed(TINY).init(jax.random.PRNGKey(0), ids)

    def gradients(ops):
        def loss(params):
            return jnp.mean(jax.nn.log_softmax(transformed(TINY, ops=ops).apply(params, ids)[0])[..., 0])
        return jax.tree_util.tree_leaves(jax.grad(loss)(params))

    for got, want in zip(gradients(cpu_ops()), gradients(XLA), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_independent_kernel_calls_run_side_by_side():
    """XLA may run independent custom calls at once, one per pool thread; each kernel's helper then
    waits in the queue behind the other calls. A kernel that waited for its queued helper hung
    here (both threads spinning); run in a subprocess, so a hang fails the test."""
    code = """
import jax, jax.numpy as jnp
from moecli.kernels.cpu import ffi as cpu_kernels
x = jax.random.normal(jax.random.PRNGKey(0), (512, 1024))
ws = [jax.random.normal(jax.random.PRNGKey(i), (1024, 1024)) * 0.03 for i in range(24)]
f = jax.jit(lambda x, ws: sum(jnp.sum(cpu_kernels.matmul(x, w)) for w in ws))
want = float(sum(jnp.sum(x @ w) for w in ws))
for _ in range(3):
    got = float(f(x, ws))
print(abs(got - want) / abs(want))
"""
    out = run_python(code, timeout=240)  # (24 independent 512 x 1024 x 1024 products hung every time; fewer did not)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 1e-4


@pytest.mark.parametrize("shape", [(3, 70, 130), (1, 64, 64), (2, 1, 5), (129, 3)])
@pytest.mark.parametrize("source,target", [("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32")])
def test_transpose_into_equals_numpy(shape, source, target):
    """The loader's tiled transpose (csrc/transpose.cc), sizes off its 64-element tiles."""
    src = np.random.default_rng(0).standard_normal(shape).astype(jnp.dtype(source))
    dst = np.full((*shape[:-2], shape[-1], shape[-2]), -1, jnp.dtype(target))
    assert cpu_kernels.transpose_into(dst, src)
    np.testing.assert_array_equal(dst, np.swapaxes(src, -1, -2).astype(jnp.dtype(target)))


def test_transpose_into_declines_what_it_cannot_do():
    src = np.ones((4, 6), np.float32)
    assert not cpu_kernels.transpose_into(np.zeros((6, 4), np.float16), src)        # another dtype
    assert not cpu_kernels.transpose_into(np.zeros((4, 6), np.float32), src)        # not the transposed shape
    assert not cpu_kernels.transpose_into(np.zeros((3, 4), np.float32), src[:, ::2])  # not contiguous


@pytest.mark.parametrize("t, window", [(1, None), (1, 3), (5, None)])
def test_attention_kernel_takes_a_position_per_row(t, window):
    """Batched serving: each batch row's queries at its own positions (start int32 [batch]) equal the
    XLA reference with per-row masks, and each row equals the kernel run on that row alone."""
    from moecli.model.ops import attend_xla

    kq, kk, kv = jax.random.split(jax.random.PRNGKey(7), 3)
    q = jax.random.normal(kq, (4, 2, 3, t, 16)) * 2
    k = jax.random.normal(kk, (4, 2, 16, 24))
    v = jax.random.normal(kv, (4, 2, 24, 16))
    starts = jnp.array([0, 9, 3, 19], jnp.int32)
    positions = starts[:, None] + jnp.arange(t)                            # [batch, t]
    want = attend_xla(q, jnp.swapaxes(k, -1, -2), v, positions, window)
    got = jax.jit(cpu_kernels.attention, static_argnums=4)(q / 4.0, k, v, starts, window)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    for row in range(4):
        alone = cpu_kernels.attention(q[row:row + 1] / 4.0, k[row:row + 1], v[row:row + 1], starts[row], window)
        np.testing.assert_allclose(np.asarray(got[row:row + 1]), np.asarray(alone), rtol=1e-6, atol=1e-6)
