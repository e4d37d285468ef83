"""Hand-written CPU kernels for batch-1 decoding, compiled on first use and called from jitted code.

XLA:CPU is fast at large matrix products but leaves memory bandwidth unused where MoE decoding
lives: it copies a dynamically chosen expert's weights before multiplying, runs a 2 MB
matrix-vector product on one core, and turns bfloat16 weights into a float32 copy first. The C++
kernels in `csrc/cpu_kernels.cc` read each chosen weight once, in place, on every core of XLA's own
thread pool, widening bfloat16 to float32 in registers (see the numbers at the top of that file and
in BENCHMARKS.md). They are XLA FFI custom calls (`jax.ffi`), so they compose with jit, scan and
the rest of the model; the pure-JAX paths in `moe.py` and `layers.py` compute the same thing and
are what the tests compare them against.

The shared library is built with the system C++ compiler ($CXX, else g++ or c++) into moecli's
cache folder the first time it is needed (~10 s), keyed by the source, the jaxlib version and the
CPU. No compiler, a failed build or MOECLI_CPU_KERNELS=0: moecli runs the pure-JAX paths instead
(`status()` says why), slower but the same numbers up to float32 rounding.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cc"
_why_not: str | None = None


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU model and flags (a cache shared by machines must
    not hand one CPU's binary to another)."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        return "\n".join(line for line in info.splitlines() if line.startswith(("model name", "flags")))
    except OSError:
        return platform.processor() or platform.machine()


def _build() -> Path:
    from moecli.runtime import cache_dir

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not compiler:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    flags = ["-O3", "-DNDEBUG", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-shared", "-fPIC",
             f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), jax.__version__, _cpu_signature(), compiler, *flags])
                         .encode()).hexdigest()[:16]
    library = cache_dir() / "kernels" / f"cpu_kernels-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:  # build aside, then rename: atomic
        built = Path(tmp) / library.name
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True,
                                timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"building the CPU kernels failed: {result.stderr.strip()[-500:]}")
        built.replace(library)
    return library


@functools.cache
def available() -> bool:
    """Whether the CPU kernels are built and registered with XLA (builds them on first call)."""
    global _why_not
    if os.environ.get("MOECLI_CPU_KERNELS", "1") == "0":
        _why_not = "turned off by MOECLI_CPU_KERNELS=0"
        return False
    try:
        library = ctypes.CDLL(str(_build()))
        for name, symbol in (("moecli_experts", "MoecliExperts"), ("moecli_matvec", "MoecliMatvec")):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        _why_not = str(e)
        return False
    return True


def status() -> str:
    """One line for --verbose: are the kernels in use, and if not, why."""
    return "CPU decode kernels: on" if available() else f"CPU decode kernels: off ({_why_not})"


def _require() -> None:
    if not available():
        raise RuntimeError(status())


def use_for(rows: int) -> bool:
    """Whether to call a kernel at trace time: CPU backend, few rows (decoding), kernels built."""
    return rows <= 8 and jax.default_backend() == "cpu" and available()


def experts(x, expert_ids, gate_weights, w_gate, w_up, w_down) -> jax.Array:
    """sum_k gate_weights[t, k] * SwiGLU_{expert_ids[t, k]}(x[t]) for tokens x [t, d]; returns x's dtype.
    Weights [experts, d, f] / [experts, f, d] in float32 or bfloat16; ids outside [0, experts) skipped."""
    _require()
    call = jax.ffi.ffi_call("moecli_experts", jax.ShapeDtypeStruct(x.shape, jnp.float32))
    y = call(x.astype(jnp.float32), expert_ids.astype(jnp.int32), gate_weights.astype(jnp.float32),
             w_gate, w_up, w_down)
    return y.astype(x.dtype)


def matvec(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., k] @ w [k, n] for a few rows, accumulated in float32; returns x's dtype."""
    _require()
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    call = jax.ffi.ffi_call("moecli_matvec", jax.ShapeDtypeStruct((rows.shape[0], w.shape[1]), jnp.float32))
    return call(rows, w).reshape(*x.shape[:-1], w.shape[1]).astype(x.dtype)
