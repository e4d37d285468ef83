"""The quantized CPU kernels (int8 / int4 weights with float16 scales, moecli/kernels/cpu/csrc/quant_*.h)
against a numpy reference (dequantize, then multiply in float64), on every vector path and engine.

Each path is a fresh process: MOECLI_CPU_ISA picks the library (native: AVX-512 here; avx2: the
-march=haswell build any x86 CPU with AVX2 runs) and MOECLI_CPU_BF16 the prompt engine, once per
process. Every case runs in each path's process, and each is a test here of its own. Prompts run
with float32 activations, which every path must multiply exactly (the kernels cap each call at the
float32 engine), and with bfloat16 ones, which take the path's fastest engine.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from moecli.errors import UsageError
from moecli.kernels.cpu import ffi as cpu_kernels

COMPILER = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(not COMPILER, reason="no C++ compiler: the CPU kernels cannot be built")
DECODE_ROWS = cpu_kernels.DECODE_ROWS


# --- the layout and the reference -------------------------------------------------------------

def random_quantized(rng: np.random.Generator, shape: tuple[int, ...], bits: int, group: int):
    """Random weights in the kernels' layout, [..., k, n]: (q, scale). Every stored value occurs
    (int8 -128..127, nibbles 0..15); scales of both signs, as float16."""
    *lead, k, n = shape
    if bits == 8:
        q = rng.integers(-128, 128, size=shape, dtype=np.int8)
    else:
        q = rng.integers(0, 256, size=(*lead, k // 2, n), dtype=np.uint8)
    scale = (rng.uniform(0.5, 2.0, size=(*lead, k // group, n)) * rng.choice([-1, 1], (*lead, k // group, n)) / 64)
    return q, scale.astype(np.float16)


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The weights [..., k, n] in float64: q8 w = q * scale[k // G]; q4 byte row i holds row 2i in its
    low nibble and 2i + 1 in its high one, each the value + 8."""
    if q.dtype == np.uint8:
        values = np.stack([(q & 15).astype(np.int16) - 8, (q >> 4).astype(np.int16) - 8], axis=-2)
        values = values.reshape(*q.shape[:-2], 2 * q.shape[-2], q.shape[-1])  # rows 2i, 2i + 1
    else:
        values = q.astype(np.int16)
    group = values.shape[-2] // scale.shape[-2]
    return values * np.repeat(scale.astype(np.float64), group, axis=-2)


def bf16(a: np.ndarray) -> np.ndarray:
    """Rounded to bfloat16 (to nearest even) by way of float32, as the AMX and AVX512-BF16 engines do."""
    return a.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def experts_reference(x, ids, gates, w_gate, w_up, w_down, rounded: bool) -> np.ndarray:
    """sum over a token's assignments of gate * down(silu(x @ gate_e) * (x @ up_e)), float64; ids
    outside [0, experts) skipped. `rounded`: inputs, hidden activations and weights rounded to bfloat16."""
    r = bf16 if rounded else (lambda a: a)
    y = np.zeros(x.shape)
    for t, k in np.ndindex(*ids.shape):
        e = ids[t, k]
        if 0 <= e < w_gate.shape[0]:
            g, u = r(x[t]) @ r(w_gate[e]), r(x[t]) @ r(w_up[e])
            y[t] += gates[t, k] * (r(g / (1 + np.exp(-g)) * u) @ r(w_down[e]))
    return y


# --- the cases ---------------------------------------------------------------------------------

# Products: k several groups of both sizes; n off every vector width (5 < 8; 37, 150 = whole
# blocks, whole vectors and a tail); m 1, 3, 6 decoding (passes of 1, 3, 4 + 2 rows), 40, 200 a
# prompt (several slivers; 320 rows > one 256-row packed block of B).
# Also q8 with an odd group size and depth (the layout allows it): rows left over from every pair.
# Prompts (m > DECODE_ROWS) twice: float32 activations, and bfloat16 ones (the name's "-xbf16").
PRODUCTS = {f"q{bits}-G{group}-m{m}-k{k}-n{n}": (bits, group, m, k, n)
            for bits in (8, 4) for group in (32, 8) for m in (1, 3, 6, 40, 200)
            for k, n in ((96, 150), (320, 37), (64, 5))}
PRODUCTS.update({f"q8-G3-m{m}-k33-n37": (8, 3, m, 33, 37) for m in (1, 40)})
# Experts: 6 of them, top 3, some assignments out of range (-1 or 6: skipped), tokens per expert
# ragged (expert 0 takes ~40% of the assignments, expert 5 none); G = 32 with (d, f) = (96, 160),
# G = 8 with (72, 40): columns past whole vectors; 200 tokens with d = 320 (two packed blocks of
# depth 256), f = 96: experts of several slivers beside experts of one.
EXPERTS = {f"experts-q{bits}-G{group}-t{tokens}": (bits, group, tokens, *{32: (96, 160), 8: (72, 40)}[group])
           for bits in (8, 4) for group in (32, 8) for tokens in (1, 3, 40)}
EXPERTS.update({f"experts-q{bits}-G32-t200-d320-f96": (bits, 32, 200, 320, 96) for bits in (8, 4)})
EXPERT_SHARES = (0.4, 0.3, 0.15, 0.1, 0.05, 0.0)  # of the assignments, per expert
BF16_X = "-xbf16"
for cases in (PRODUCTS, EXPERTS):
    cases.update({name + BF16_X: spec for name, spec in cases.items() if spec[2] > DECODE_ROWS})


def is_prompt(case: str) -> bool:
    rows = PRODUCTS[case][2] if case in PRODUCTS else EXPERTS[case][2]
    return rows > DECODE_ROWS


def run_case(case: str) -> dict[str, float]:
    """The kernels' result for `case` against the reference, max |error| / max |reference|: "exact"
    (the weights as dequantized), and "rounded" (inputs, weights and hidden activations rounded to
    bfloat16 first, as the AMX and AVX512-BF16 engines do)."""
    import jax

    rng = np.random.default_rng(zlib.crc32(case.encode()))
    x_dtype = ml_dtypes.bfloat16 if case.endswith(BF16_X) else np.float32
    if case in PRODUCTS:
        bits, group, m, k, n = PRODUCTS[case]
        x = rng.standard_normal((m, k)).astype(x_dtype)
        q, scale = random_quantized(rng, (k, n), bits, group)
        kernel = cpu_kernels.matvec_q if m <= DECODE_ROWS else cpu_kernels.matmul_q
        got = np.asarray(jax.jit(kernel)(x, q, scale))
        want = {kind: r(x.astype(np.float64)) @ r(dequantize(q, scale))
                for kind, r in (("exact", lambda a: a), ("rounded", bf16))}
    else:
        bits, group, tokens, d, f = EXPERTS[case]
        n_experts, top_k = len(EXPERT_SHARES), 3
        x = rng.standard_normal((tokens, d)).astype(x_dtype)
        ids = rng.choice(n_experts, (tokens, top_k), p=EXPERT_SHARES).astype(np.int32)
        away = rng.random(ids.shape) < 0.4  # another device's experts: -1 or n_experts, skipped
        away[:, 0], away[0, -1] = False, True  # every token keeps one; at least one goes
        ids[away] = rng.choice([-1, n_experts], size=int(away.sum()))
        gates = rng.uniform(0, 1, (tokens, top_k)).astype(np.float32)
        weights = [random_quantized(rng, shape, bits, group)
                   for shape in ((n_experts, d, f), (n_experts, d, f), (n_experts, f, d))]
        got = np.asarray(jax.jit(cpu_kernels.experts_q)(x, ids, gates, *(a for pair in weights for a in pair)))
        want = {kind: experts_reference(x.astype(np.float64), ids, gates, *(dequantize(*pair) for pair in weights),
                                        kind == "rounded") for kind in ("exact", "rounded")}
    assert got.dtype == np.float32 and got.shape == want["exact"].shape
    return {kind: float(np.max(np.abs(got - w)) / np.max(np.abs(w))) for kind, w in want.items()}


# --- the paths: one process each -----------------------------------------------------------------

def cpu_flags() -> set[str]:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))


# (MOECLI_CPU_ISA, MOECLI_CPU_BF16): the native build with each prompt engine it may have, and the
# AVX2 build (float32 engine only: no AVX512-BF16 or AMX code in it) where the CPU runs it.
PATHS = {"native": ("native", None), "native-dpbf16": ("native", "dpbf16"), "native-float32": ("native", "float32"),
         "avx2": ("avx2", None)}
AVX2_OK = cpu_kernels.supports_avx2()


def run_python(code: str, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (this folder on the path), `env` set from the start."""
    try:
        return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {timeout} s")


def path_cases(path: str) -> list[str]:
    """A path with a capped engine differs from plain native only in prompts: it runs those."""
    cases = [*PRODUCTS, *EXPERTS]
    return cases if PATHS[path][1] is None else [c for c in cases if is_prompt(c)]


_results: dict[str, dict] = {}


def path_results(path: str) -> dict:
    """{"isa": the library's vector path, "engine": its prompt engine, "errors": {case: error}} for
    `path`, computed once, in one subprocess (a crash fails every case of the path, with its stderr)."""
    if path not in _results:
        isa, cap = PATHS[path]
        code = f"""if True:
            import json
            from test_quant_kernels import cpu_kernels, run_case
            assert cpu_kernels.available(), cpu_kernels.status()
            errors = {{case: run_case(case) for case in {path_cases(path)!r}}}
            print(json.dumps({{"isa": cpu_kernels.cpu_isa(), "engine": cpu_kernels.bf16_engine(),
                              "status": cpu_kernels.status(), "errors": errors}}))
        """
        out = run_python(code, MOECLI_CPU_ISA=isa, **({"MOECLI_CPU_BF16": cap} if cap else {}))
        _results[path] = json.loads(out.stdout) if out.returncode == 0 else {"failed": out.stderr[-3000:]}
    result = _results[path]
    assert "failed" not in result, result.get("failed")
    return result


def needs_avx2(path: str):
    return pytest.mark.skipif(PATHS[path][0] == "avx2" and not AVX2_OK, reason="this CPU cannot run AVX2 code")


# Float32 throughout: the sums' rounding only (q4's offset, taken off per group, included).
# Rounded to bfloat16 (inputs and weights alike in the reference): the float32 sums of exact products;
# in the experts also hidden activations whose float32 and float64 sums round to neighbouring
# bfloat16 values (a few in 10^4 at d = 320, each one bfloat16 step: up to ~2e-5 of the output).
BOUNDS = {"exact": 5e-6, "rounded": 1e-5, "rounded experts": 5e-5}
ROUNDING_SHOWS = 2e-4  # bfloat16 weights against exact ones: ~2e-3 in these cases


@pytest.mark.parametrize("path,case", [pytest.param(path, case, marks=needs_avx2(path))
                                       for path in PATHS for case in path_cases(path)])
def test_quantized_kernel_equals_reference(path, case):
    """Float32 activations exact on every path and engine; bfloat16 activations in a prompt on the
    path's engine, which rounds the weights too unless it is the float32 one (then exact)."""
    result = path_results(path)
    errors, where = result["errors"][case], f"{path} ({result['isa']}, {result['engine']}): {case}"
    rounds = result["engine"] != "float32" and is_prompt(case) and case.endswith(BF16_X)
    bound = BOUNDS["exact" if not rounds else "rounded experts" if case in EXPERTS else "rounded"]
    assert errors["rounded" if rounds else "exact"] < bound, (where, errors)
    if rounds:  # the fastest engine took them: not capped at float32 like float32 activations
        assert errors["exact"] > ROUNDING_SHOWS, (where, errors)


@pytest.mark.parametrize("path", [pytest.param(path, marks=needs_avx2(path)) for path in PATHS])
def test_each_path_runs_the_vector_code_it_names(path):
    """MOECLI_CPU_ISA=avx2 is the 8-lane AVX2 path with the float32 prompt engine, whatever the CPU
    has besides; native is the widest this CPU has; a cap picks the engine it names or a lower one."""
    result = path_results(path)
    isa, cap = PATHS[path]
    flags = cpu_flags()
    if isa == "avx2":
        assert (result["isa"], result["engine"]) == ("avx2", "float32")
        assert result["status"] == "CPU kernels: on (built for avx2)"
    else:
        assert result["isa"] == ("avx512" if "avx512f" in flags else "avx2" if AVX2_OK else "generic")
        best = cpu_kernels.BF16_ENGINES.index(cpu_kernels.bf16_engine())  # this process: uncapped, native
        capped = cpu_kernels.BF16_ENGINES.index(cap or "amx")
        assert cpu_kernels.BF16_ENGINES.index(result["engine"]) == max(best, capped)


def test_avx2_on_a_cpu_without_it_is_refused(monkeypatch):
    """-march=haswell code would die of an illegal instruction there: refused before building."""
    monkeypatch.setenv("MOECLI_CPU_ISA", "avx2")
    monkeypatch.setattr(cpu_kernels, "supports_avx2", lambda: False)
    with pytest.raises(UsageError, match="MOECLI_CPU_ISA=avx2 needs an x86 CPU with AVX2, FMA and F16C"):
        cpu_kernels.library_path()


def test_bad_isa_is_one_clear_error():
    code = """if True:
        from moecli.errors import UsageError
        from moecli.kernels.cpu import ffi
        try:
            ffi.available()
        except UsageError as err:
            print(err.one_line())
    """
    out = run_python(code, MOECLI_CPU_ISA="sse2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("MOECLI_CPU_ISA='sse2' is not a target for the CPU kernels — choose native or "
                                  "avx2, or unset it")


# --- what the kernels refuse ----------------------------------------------------------------------

Q8 = {"x": ((3, 32), "float32"), "q": ((32, 48), "int8"), "scale": ((4, 48), "float16")}
Q4 = {**Q8, "q": ((16, 48), "uint8")}
EXPERTS_Q = {"x": ((2, 32), "float32"), "expert_ids": ((2, 2), "int32"), "gate_weights": ((2, 2), "float32"),
             "w_gate_q": ((4, 16, 48), "uint8"), "w_gate_scale": ((4, 4, 48), "float16"),
             "w_up_q": ((4, 16, 48), "uint8"), "w_up_scale": ((4, 4, 48), "float16"),
             "w_down_q": ((4, 24, 32), "uint8"), "w_down_scale": ((4, 6, 32), "float16")}
GROUPED_Q = {**EXPERTS_Q, "x": ((12, 32), "float32"), "expert_ids": ((12, 2), "int32"),
             "gate_weights": ((12, 2), "float32")}
BAD_CALLS = {  # case: (FFI target or ffi.py wrapper, operands, changes {name: (shape, dtype)}, what the error says)
    "matvec_q: float32 q": ("moecli_matvec_q", Q8, {"q": ((32, 48), "float32")},
                            "q is float32, expected int8 or uint8"),
    "matmul_q: float32 q": ("moecli_matmul_q", Q8, {"q": ((32, 48), "float32")},
                            "q is float32, expected int8 or uint8"),
    "matvec_q: float32 scale": ("moecli_matvec_q", Q8, {"scale": ((4, 48), "float32")},
                                "scale is float32, expected float16"),
    "matvec_q: q4 of unpacked rows": ("moecli_matvec_q", Q4, {"q": ((32, 48), "uint8")},
                                      "q has shape [32, 48], expected 16 rows (uint8: two int4 rows a byte)"),
    "matmul_q: q8 short of rows": ("moecli_matmul_q", Q8, {"q": ((31, 48), "int8")},
                                   "q has shape [31, 48], expected 32 rows"),
    "matvec_q: groups that do not divide k": ("moecli_matvec_q", Q8, {"scale": ((5, 48), "float16")},
                                              "scale has shape [5, 48]: 5 groups do not split 32 rows"),
    "matmul_q: q4 groups of one row": ("moecli_matmul_q", Q4, {"scale": ((32, 48), "float16")},
                                       ("scale has shape [32, 48]: 32 groups do not split 32 rows into groups "
                                        "of an even size")),
    "matvec_q: scale narrower than q": ("moecli_matvec_q", Q8, {"scale": ((4, 40), "float16")},
                                        "scale has shape [4, 40], expected [4, 48]"),
    "matvec_q: a result too wide": ("moecli_matvec_q", Q8, {"y": ((3, 64), "float32")},
                                    "y has shape [3, 64], expected [3, 48]"),
    "experts_q: mixed q dtypes": ("moecli_experts_q", EXPERTS_Q, {"w_up_q": ((4, 32, 48), "int8")},
                                  "w_up_q is int8, expected uint8"),
    "experts_q: w_down of the wrong depth": ("moecli_experts_q", EXPERTS_Q, {"w_down_q": ((4, 48, 32), "uint8"),
                                                                            "w_down_scale": ((4, 6, 32), "float16")},
                                             "w_down_q has shape [4, 48, 32], expected 24 rows"),
    "grouped_experts_q: float32 w_gate_q": ("moecli_grouped_experts_q", GROUPED_Q,
                                            {"w_gate_q": ((4, 16, 48), "float32")},
                                            "w_gate_q is float32, expected int8 or uint8"),
    "grouped_experts_q: float32 scale": ("moecli_grouped_experts_q", GROUPED_Q,
                                         {"w_down_scale": ((4, 6, 32), "float32")},
                                         "w_down_scale is float32, expected float16"),
    "matmul_q: engine_cap past float32": ("moecli_matmul_q", Q8, {"engine_cap": 3},
                                          "engine_cap 3 is not 0 (amx), 1 (dpbf16) or 2 (float32)"),
    "grouped_experts_q: negative engine_cap": ("moecli_grouped_experts_q", GROUPED_Q, {"engine_cap": -1},
                                               "engine_cap -1 is not 0 (amx), 1 (dpbf16) or 2 (float32)"),
    # moecli/kernels/cpu/ffi.py's wrappers refuse while tracing:
    "ffi.matvec_q: float32 q": ("matvec_q", Q8, {"q": ((32, 48), "float32")},
                                "TypeError: moecli_matvec_q: q is float32, expected int8 or uint8"),
    "ffi.matmul_q: bfloat16 scale": ("matmul_q", Q8, {"scale": ((4, 48), "bfloat16")},
                                     "TypeError: moecli_matmul_q: scale is bfloat16, expected float16"),
    "ffi.experts_q: mixed q dtypes": ("experts_q", EXPERTS_Q, {"w_down_q": ((4, 48, 32), "int8")},
                                      "TypeError: moecli_experts_q: w_down_q is int8, expected uint8"),
}


PROMPT_TARGETS = ("moecli_matmul_q", "moecli_grouped_experts_q")  # with an engine_cap attribute


def bad_call(target: str, operands: dict, changes: dict):
    """`target` (an FFI target, called past ffi.py's checks, or a wrapper of ffi.py) on `operands`
    with `changes` ("y": the FFI result's shape and dtype; "engine_cap": a prompt target's attribute,
    else 0)."""
    import jax
    import jax.numpy as jnp

    specs = {**operands, **changes}
    arrays = [jnp.ones(*specs[name]) for name in operands]
    if not target.startswith("moecli_"):
        return getattr(cpu_kernels, target)(*arrays)
    rows, columns = specs["x"][0][0], (specs["q"][0][-1] if "q" in specs else specs["x"][0][1])
    y_shape, y_dtype = specs.get("y", ((rows, columns), "float32"))
    attributes = {"engine_cap": np.int64(specs.get("engine_cap", 0))} if target in PROMPT_TARGETS else {}
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(y_shape, y_dtype))(*arrays, **attributes)


@pytest.fixture(scope="module")
def bad_call_errors():
    """Every BAD_CALLS case in one subprocess: {case: "Type: message", or None if it ran}, the case
    started last, and how the process ended (a crash stops it there)."""
    code = """if True:
        import json, jax
        from test_quant_kernels import BAD_CALLS, bad_call, cpu_kernels
        assert cpu_kernels.available(), cpu_kernels.status()
        for case, (target, operands, changes, _) in BAD_CALLS.items():
            print(json.dumps(["started", case]), flush=True)
            try:
                jax.block_until_ready(bad_call(target, operands, changes))
                error = None
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
            print(json.dumps(["done", case, error]), flush=True)
    """
    out = run_python(code)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    return {line[1]: line[2] for line in lines if line[0] == "done"}, (lines[-1][1] if lines else None), out


@pytest.mark.parametrize("case", BAD_CALLS)
def test_a_wrong_buffer_is_an_error_not_a_crash(case, bad_call_errors):
    errors, last, out = bad_call_errors
    assert case in errors, f"the process ended (exit {out.returncode}) in {last!r}: {out.stderr[-2000:]}"
    target, _, _, words = BAD_CALLS[case]
    assert errors[case] is not None, f"{case}: the kernel ran"
    assert (words if words.startswith("TypeError") else f"{target}: {words}") in errors[case]


def test_a_bad_engine_cap_is_refused_while_tracing():
    import jax.numpy as jnp

    assert cpu_kernels.prompt_engine_cap(jnp.ones(2, jnp.float32)) == {"engine_cap": 2}  # float32: exact
    assert cpu_kernels.prompt_engine_cap(jnp.ones(2, jnp.float16)) == {"engine_cap": 2}
    assert cpu_kernels.prompt_engine_cap(jnp.ones(2, jnp.bfloat16)) == {"engine_cap": 0}  # the fastest
    with pytest.raises(ValueError, match="engine_cap='fastest': expected one of amx, dpbf16, float32"):
        cpu_kernels.prompt_engine_cap(jnp.ones(2), "fastest")
