"""Hand-written CPU kernels for the MoE experts and attention, compiled at install time (or on first use), called from jitted code.

XLA:CPU is fast at one large matrix product but slow where a MoE model spends its time:
- decoding (csrc/cpu_kernels.cc): it copies a dynamically chosen expert's weights before
  multiplying, runs a 2 MB matrix-vector product on one core, and turns bfloat16 weights into a
  float32 copy first. The kernels read each chosen weight once, in place, on every core of XLA's
  own thread pool, widening bfloat16 to float32 in registers.
- prompts (csrc/grouped_gemm.cc): each expert gets a run-time number of tokens, which static
  shapes can only pad; the kernel is one grouped matrix product over exactly those tokens. The
  dense products go through the same engine (XLA's float32 dot is ~20% slower one after another,
  its bfloat16 dot slower still).
- attention (csrc/attention.cc): XLA computes and masks scores over the whole fixed-size cache;
  the kernel visits only the keys each query may see (online softmax, as in FlashAttention).
They are XLA FFI custom calls (`jax.ffi`), so they compose with jit, scan and the rest of the
model; the pure-JAX paths in `moecli/model/` compute the same thing, are what the tests
compare them against, and give the gradients (`moecli.kernels.gradients`); `moecli.kernels.cpu.backend`
decides where each kernel runs. One more, the loader's
transpose (csrc/transpose.cc, `transpose_into`), is a plain C function called through ctypes.
Numbers in BENCHMARKS.md.

Quantized weights (`--quantize q8|q4`: int8, or int4 packed two a byte, with a float16 scale per
group of rows; the layout in csrc/quant_unpack.h) have their own kernels, `matvec_q`, `matmul_q`
and `experts_q`: decoding reads the packed bytes in place and scales each group's sums in
registers (csrc/quant_matvec.h); prompts dequantize while packing the matrix engine's panels
(csrc/quant_pack.h), so they run on the same float32 / AVX512-BF16 / AMX engine as bfloat16, capped
per call (`prompt_engine_cap`): float32 activations (a float32 model quantized) take the float32
engine, exact, whatever the process's bfloat16 engine; bfloat16 ones take the fastest.

Checkpoints' packed experts have one gathered matrix-vector kernel each, `expert_matvec_mxfp4`
(gpt-oss's MXFP4, csrc/mxfp4.cc) and `expert_matvec_fp8` (block-FP8's e4m3 bytes and float32 block
scales, csrc/fp8.cc): one product per assignment, each chosen expert's bytes read once a call, a
prompt's tokens included (csrc/expert_gather.h plans the work of both).

The shared library is built with the system C++ compiler ($CXX, else g++ or c++) by `pip install`
(setup.py; the library then ships inside the package), or else into moecli's cache folder the first
time it is needed (~15 s); either way it is keyed by the sources, jaxlib's FFI headers, the CPU, the
compiler and the flags (`moecli.kernels.cpu.build`). No compiler, a failed build or
MOECLI_CPU_KERNELS=0: moecli runs the pure-JAX paths instead (`status()` says why), slower but the
same numbers up to float32 rounding.

What it is compiled for is chosen per process by MOECLI_CPU_ISA (`ISAS`): `native` (the default,
-march=native: AVX-512, AVX512-BF16 and AMX where this CPU has them) or `avx2` (-march=haswell:
AVX2, FMA and F16C only, as on an AVX2-only AMD EPYC), each its own cached library. The kernels'
vector paths follow the build's target (`#ifdef __AVX512F__` ...), so one choice per library
covers every kernel, not only the quantized ones; the tests run the quantized kernels under both
on any x86 CPU that has AVX2 (`cpu_isa()` says which vector path the loaded library has).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moecli import env
from moecli.errors import UsageError
from moecli.kernels.cpu import build

_why_not: str | None = None
_library: ctypes.CDLL | None = None

ISAS = build.ISAS
AVX2_FLAGS = ("avx2", "fma", "f16c")  # what -march=haswell code needs of the CPU (/proc/cpuinfo's names)


def build_isa() -> str:
    """What the library is built for: MOECLI_CPU_ISA, checked: "native" (unset) or "avx2", which this CPU must be able to run."""
    value = (env.text("MOECLI_CPU_ISA") or "native").strip().lower()
    if value not in ISAS:
        raise UsageError(f"MOECLI_CPU_ISA={env.text('MOECLI_CPU_ISA')!r} is not a target for the CPU kernels",
                         f"choose {' or '.join(ISAS)}, or unset it")
    if value == "avx2" and not supports_avx2():
        raise UsageError("MOECLI_CPU_ISA=avx2 needs an x86 CPU with AVX2, FMA and F16C, which this one lacks",
                         "unset MOECLI_CPU_ISA (native builds for this CPU)")
    return value


def supports_avx2() -> bool:
    """Whether this CPU runs -march=haswell code (AVX2, FMA, F16C)."""
    flags = next((line.split(":", 1)[1].split() for line in build.cpu_signature().splitlines()
                  if line.startswith("flags")), [])
    return all(flag in flags for flag in AVX2_FLAGS)


def library_path() -> Path:
    """The library for these sources, this jaxlib's FFI headers, this CPU, compiler and
    MOECLI_CPU_ISA: the one `pip install` built into the package when it matches (`build.PREBUILT`),
    else where it is (or will be) built in moecli's cache folder."""
    from moecli.runtime import cache_dir

    name = build.library_name(build_isa(), Path(jax.ffi.include_dir()))
    prebuilt = build.PREBUILT / name
    return prebuilt if prebuilt.exists() else cache_dir() / "kernels" / name


def is_built() -> bool:
    """Whether the kernels are already built for this machine (so loading them takes no time)."""
    try:
        return library_path().exists()
    except RuntimeError:  # no compiler: nothing to build either
        return True


def _build() -> Path:
    """The library, built into the cache folder unless it exists (`build.build`)."""
    library = library_path()
    return library if library.exists() else build.build(library.parent, build_isa(), Path(jax.ffi.include_dir()))


_building: concurrent.futures.Future | None = None


def start_building() -> None:
    """Start building the kernels in the background, if they are not built yet, so the compiler runs
    while the caller does other work (a command's imports, reading the weights); `available()`
    then waits for it. A no-op when built, switched off, or already started."""
    global _building
    if _building is None and env.switch("MOECLI_CPU_KERNELS") and not is_built():
        _building = concurrent.futures.ThreadPoolExecutor(1).submit(_build)


@functools.cache
def available() -> bool:
    """Whether the CPU kernels are built and registered with XLA (builds them on first call)."""
    global _why_not
    if not env.switch("MOECLI_CPU_KERNELS"):
        _why_not = "turned off by MOECLI_CPU_KERNELS=0"
        return False
    cap = _bf16_cap()  # a bad value is an error before the ~15 s build, not after
    build_isa()
    try:
        global _library
        library = _library = ctypes.CDLL(str(_building.result() if _building else _build()))
        if library.MoecliSetBf16Cap(cap) != 0:  # before any kernel runs: the engine is chosen once
            raise RuntimeError("the CPU kernels' bfloat16 engine was chosen before MOECLI_CPU_BF16 could cap it")
        for name, symbol in (("moecli_experts", "MoecliExperts"), ("moecli_matvec", "MoecliMatvec"),
                             ("moecli_grouped_experts", "MoecliGroupedExperts"), ("moecli_attention", "MoecliAttention"),
                             ("moecli_matmul", "MoecliMatmul"), ("moecli_matvec_q", "MoecliMatvecQ"),
                             ("moecli_matmul_q", "MoecliMatmulQ"), ("moecli_experts_q", "MoecliExpertsQ"),
                             ("moecli_grouped_experts_q", "MoecliGroupedExpertsQ"),
                             ("moecli_expert_matvec_mxfp4", "MoecliExpertMatvecMxfp4"),
                             ("moecli_expert_matvec_fp8", "MoecliExpertMatvecFp8")):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        _why_not = str(e)
        return False
    return True


BF16_ENGINES = ("amx", "dpbf16", "float32")  # csrc/grouped_gemm.cc's bf16_engine(), best first


def _bf16_cap() -> int:
    """MOECLI_CPU_BF16 as csrc/grouped_gemm.cc's MoecliSetBf16Cap takes it: the index of the best
    engine it allows in BF16_ENGINES (0, no cap, when unset)."""
    cap = env.text("MOECLI_CPU_BF16")
    if cap is None:
        return 0
    if cap.strip().lower() not in BF16_ENGINES:
        raise UsageError(f"MOECLI_CPU_BF16={cap!r} is not an engine for bfloat16 prompts",
                         f"choose {', '.join(BF16_ENGINES[:-1])} or {BF16_ENGINES[-1]}, or unset it")
    return BF16_ENGINES.index(cap.strip().lower())


def bf16_engine() -> str | None:
    """What multiplies a prompt's bfloat16 weights: "amx" (AMX tiles, csrc/gemm_amx.h), "dpbf16"
    (AVX512-BF16 dot products, csrc/gemm_dpbf16.h) or "float32" (widened to float32); the first
    two round activations to bfloat16. The best the CPU has, unless MOECLI_CPU_BF16 names a lower
    one. None without the kernels."""
    return BF16_ENGINES[_library.MoecliBf16Engine()] if available() else None


def cpu_isa() -> str | None:
    """The quantized kernels' vector path in the loaded library: "avx512", "avx2" or "generic"
    (what `build_isa()` made of this CPU). None without the kernels."""
    if not available():
        return None
    _library.MoecliQuantIsa.restype = ctypes.c_char_p
    return _library.MoecliQuantIsa().decode()


def status() -> str:
    """One line for --verbose: are the kernels in use, and if not, why."""
    if not available():
        return f"CPU kernels: off ({_why_not})"
    engine = {"amx": "AMX tiles", "dpbf16": "AVX512-BF16"}.get(bf16_engine())
    notes = [f"bfloat16 prompts on {engine}"] if engine else []
    if build_isa() != "native":
        notes.append(f"built for {build_isa()}")
    return "CPU kernels: on" + (f" ({'; '.join(notes)})" if notes else "")


def _require() -> None:
    if not available():
        raise RuntimeError(status())


WEIGHT_DTYPES = ("float32", "bfloat16")  # what the kernels multiply; float16 weights take plain XLA
ACTIVATION_DTYPES = ("float32", "bfloat16", "float16")  # cast to float32 before a kernel sees them


def _check_dtypes(kernel: str, allowed: tuple[str, ...], **arrays) -> None:
    """A TypeError naming the kernel, the array and its dtype unless every one of `arrays` has a
    dtype in `allowed`. The kernels read raw memory: csrc/common.h's check_operands refuses a wrong
    buffer too, but only once the program runs; this says so while tracing, in Python's terms."""
    for name, array in arrays.items():
        dtype = jnp.dtype(array.dtype).name
        if dtype not in allowed:
            raise TypeError(f"{kernel}: {name} is {dtype}, expected "
                            + (f"{', '.join(allowed[:-1])} or " if allowed[:-1] else "") + allowed[-1])


DECODE_ROWS = 8  # up to this many rows a product is a few matrix-vector products (decoding)


def experts(x, expert_ids, gate_weights, w_gate, w_up, w_down) -> jax.Array:
    """sum_k gate_weights[t, k] * SwiGLU_{expert_ids[t, k]}(x[t]) for tokens x [t, d]; returns x's dtype.
    Weights [experts, d, f] / [experts, f, d] in float32 or bfloat16; ids outside [0, experts) skipped.
    A few tokens (decoding) run as matrix-vector products split over the cores
    (csrc/cpu_kernels.cc); more (a prompt) as one grouped matrix product (csrc/grouped_gemm.cc)."""
    _require()
    kernel = "moecli_experts" if x.shape[0] <= DECODE_ROWS else "moecli_grouped_experts"
    _check_dtypes(kernel, ACTIVATION_DTYPES, x=x)
    _check_dtypes(kernel, WEIGHT_DTYPES, w_gate=w_gate)
    _check_dtypes(kernel, (jnp.dtype(w_gate.dtype).name,), w_up=w_up, w_down=w_down)  # all three alike
    call = jax.ffi.ffi_call(kernel, jax.ShapeDtypeStruct(x.shape, jnp.float32))
    y = call(x.astype(jnp.float32), expert_ids.astype(jnp.int32), gate_weights.astype(jnp.float32),
             w_gate, w_up, w_down)
    return y.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, start: jax.Array, window: int | None) -> jax.Array:
    """Causal softmax(q k) v for q [batch, kv_heads, group, t, head_dim] (already scaled) at positions
    start.. (an int32 scalar, or [batch]: each row's own) over keys [batch, kv_heads, head_dim, len] and
    values [batch, kv_heads, len, head_dim]:
    each query sees the keys at or before its position (within `window` positions, if given).
    Returns float32 [batch, kv_heads, group, t, head_dim]."""
    _require()
    _check_dtypes("moecli_attention", ACTIVATION_DTYPES, q=q, k=k, v=v)
    call = jax.ffi.ffi_call("moecli_attention", jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                jnp.asarray(start, jnp.int32), window=np.int64(window or 0))


def _product(target: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., k] @ w [k, n] through the kernel `target`, accumulated in float32; returns x's dtype."""
    _require()
    _check_dtypes(target, ACTIVATION_DTYPES, x=x)
    _check_dtypes(target, WEIGHT_DTYPES, w=w)
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows.shape[0], w.shape[1]), jnp.float32))
    return call(rows, w).reshape(*x.shape[:-1], w.shape[1]).astype(x.dtype)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., k] @ w [k, n] for a prompt's rows, w float32 or bfloat16 (see `bf16_engine`)."""
    return _product("moecli_matmul", x, w)


_TRANSPOSE_KINDS = {("float32", "float32"): 0, ("bfloat16", "bfloat16"): 1, ("bfloat16", "float32"): 2}


def transpose_into(dst: np.ndarray, src: np.ndarray) -> bool:
    """dst[...] = src with its last two axes swapped (and bfloat16 widened to a float32 dst), by the
    tiled copy of csrc/transpose.cc: ~4x numpy's on the development VM, which made transposing
    half of loading a checkpoint. Both arrays C-contiguous. Used on any backend (the host reads the
    checkpoint either way), so on a GPU machine it builds the library too. Returns False, copying
    nothing, where it does not apply (kernels unavailable or off, other dtypes): the caller copies."""
    kind = _TRANSPOSE_KINDS.get((src.dtype.name, dst.dtype.name))
    if (kind is None or src.ndim < 2 or dst.shape != (*src.shape[:-2], src.shape[-1], src.shape[-2])
            or not (src.flags.c_contiguous and dst.flags.c_contiguous) or not available()):
        return False
    rows, cols = src.shape[-2:]
    function = _library.MoecliTranspose
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return function(src.ctypes.data, dst.ctypes.data, src.size // max(rows * cols, 1), rows, cols, kind) == 0


def matvec(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., k] @ w [k, n] for a few rows (decoding), w float32 or bfloat16."""
    return _product("moecli_matvec", x, w)


PACKED_DTYPES = ("int8", "uint8")  # q8; q4 (two int4 values a byte), csrc/quant_unpack.h's layout
SCALE_DTYPES = ("float16",)


def prompt_engine_cap(x: jax.Array, engine_cap: str | None = None) -> dict:
    """The quantized prompt kernels' per-call engine cap, as their `engine_cap` attribute: the best
    engine of BF16_ENGINES the call may use (a lower one where the CPU or MOECLI_CPU_BF16 says so).
    By default "float32" unless x is bfloat16: AMX and AVX512-BF16 round activations to bfloat16,
    which loses float32 (and float16) activations' precision but not bfloat16 ones'."""
    if engine_cap is None:
        engine_cap = "amx" if jnp.dtype(x.dtype) == jnp.bfloat16 else "float32"
    if engine_cap not in BF16_ENGINES:
        raise ValueError(f"engine_cap={engine_cap!r}: expected one of {', '.join(BF16_ENGINES)}")
    return {"engine_cap": np.int64(BF16_ENGINES.index(engine_cap))}


def _quantized_product(target: str, x: jax.Array, q: jax.Array, scale: jax.Array, **attributes) -> jax.Array:
    """x [..., k] @ W [k, n] through the kernel `target`, W quantized as (q, scale); float32."""
    _require()
    _check_dtypes(target, ACTIVATION_DTYPES, x=x)
    _check_dtypes(target, PACKED_DTYPES, q=q)
    _check_dtypes(target, SCALE_DTYPES, scale=scale)
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows.shape[0], q.shape[-1]), jnp.float32))
    return call(rows, q, scale, **attributes).reshape(*x.shape[:-1], q.shape[-1])


def matvec_q(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x [..., k] @ W for a few rows (decoding), W [k, n] quantized: q int8 [k, n] (q8) or uint8
    [k / 2, n] (q4: rows 2i and 2i + 1 in byte row i's low and high nibbles, each value + 8), scale
    float16 [k / G, n]. Float32, each packed byte read once, in place (csrc/quant_matvec.h)."""
    return _quantized_product("moecli_matvec_q", x, q, scale)


def matmul_q(x: jax.Array, q: jax.Array, scale: jax.Array, engine_cap: str | None = None) -> jax.Array:
    """`matvec_q` for a prompt's rows: the matrix engine of bfloat16 weights (see `bf16_engine`) at
    or below `engine_cap` (`prompt_engine_cap`: float32 activations on the float32 engine), the
    weights dequantized as it packs them (csrc/quant_pack.h). Float32."""
    return _quantized_product("moecli_matmul_q", x, q, scale, **prompt_engine_cap(x, engine_cap))


def experts_q(x, expert_ids, gate_weights, w_gate_q, w_gate_scale, w_up_q, w_up_scale, w_down_q,
              w_down_scale, engine_cap: str | None = None) -> jax.Array:
    """`experts` with quantized weights, each a (q, scale) pair as in `matvec_q` with a leading
    [experts] axis: q [experts, d, f] or [experts, d / 2, f] (w_down: f and d swapped), scale
    [experts, rows / G, columns]; all three q int8 or all three uint8. Float32; ids outside
    [0, experts) skipped. A few tokens decode (csrc/cpu_kernels.cc), more take the grouped product
    on the engine `engine_cap` allows (as in `matmul_q`)."""
    _require()
    kernel = "moecli_experts_q" if x.shape[0] <= DECODE_ROWS else "moecli_grouped_experts_q"
    _check_dtypes(kernel, ACTIVATION_DTYPES, x=x)
    _check_dtypes(kernel, PACKED_DTYPES, w_gate_q=w_gate_q)
    _check_dtypes(kernel, (jnp.dtype(w_gate_q.dtype).name,), w_up_q=w_up_q, w_down_q=w_down_q)  # all three alike
    _check_dtypes(kernel, SCALE_DTYPES, w_gate_scale=w_gate_scale, w_up_scale=w_up_scale, w_down_scale=w_down_scale)
    attributes = prompt_engine_cap(x, engine_cap) if kernel == "moecli_grouped_experts_q" else {}
    call = jax.ffi.ffi_call(kernel, jax.ShapeDtypeStruct(x.shape, jnp.float32))
    return call(x.astype(jnp.float32), expert_ids.astype(jnp.int32), gate_weights.astype(jnp.float32),
                w_gate_q, w_gate_scale, w_up_q, w_up_scale, w_down_q, w_down_scale, **attributes)


def expert_matvec_mxfp4(x: jax.Array, expert_ids: jax.Array, blocks: jax.Array, scales: jax.Array) -> jax.Array:
    """y[a] = x[a] @ W[expert_ids[a]] for rows x [a, k], W a stack of MXFP4 matrices [e, k, n]
    (`moecli.model.mxfp4`: blocks uint8 [e, n, k / 2], scales uint8 [e, n, k / 32]); float32 [a, n],
    rows whose id is outside [0, e) zero. Each chosen expert's bytes read once, in place, unpacked and
    scaled in registers (csrc/mxfp4.cc)."""
    _require()
    kernel = "moecli_expert_matvec_mxfp4"
    _check_dtypes(kernel, ACTIVATION_DTYPES, x=x)
    _check_dtypes(kernel, ("uint8",), blocks=blocks, scales=scales)
    call = jax.ffi.ffi_call(kernel, jax.ShapeDtypeStruct((x.shape[0], blocks.shape[1]), jnp.float32))
    return call(x.astype(jnp.float32), expert_ids.astype(jnp.int32), blocks, scales)


def expert_matvec_fp8(x: jax.Array, expert_ids: jax.Array, weight: jax.Array, scale: jax.Array,
                      block: tuple[int, int]) -> jax.Array:
    """y[a] = x[a] @ W[expert_ids[a]] for rows x [a, k], W a stack of block-FP8 matrices [e, k, n]
    (`moecli.model.fp8`: weight uint8 [e, n, k] of e4m3 codes, scale float32 [e, ceil(n / bo), ceil(k / bi)],
    `block` (bo, bi)); float32 [a, n], rows whose id is outside [0, e) zero. Each chosen expert's bytes
    read once, in place, converted to float32 in registers and scaled a block at a time (csrc/fp8.cc)."""
    _require()
    kernel = "moecli_expert_matvec_fp8"
    _check_dtypes(kernel, ACTIVATION_DTYPES, x=x)
    _check_dtypes(kernel, ("uint8",), weight=weight)
    _check_dtypes(kernel, ("float32",), scale=scale)
    call = jax.ffi.ffi_call(kernel, jax.ShapeDtypeStruct((x.shape[0], weight.shape[1]), jnp.float32))
    return call(x.astype(jnp.float32), expert_ids.astype(jnp.int32), weight, scale,
                block_rows=np.int64(block[0]), block_cols=np.int64(block[1]))
