"""Compiling the CPU kernels (csrc/) into one shared library: at install time where a compiler
exists, else on first use.

This module uses the standard library only, so `setup.py` can load it by path inside pip's
isolated build environment, where jax is not installed: the build then compiles against the
copies of XLA's FFI headers in csrc/vendor/ (from jaxlib, Apache-2.0), and `pip install` ships
the library inside the package (`PREBUILT`). At run time `moecli.kernels.cpu.ffi` looks for a
library built from the same sources, headers, FFI headers (compared by content: the installed
jaxlib's against the vendored copies), CPU, compiler and target flags — the name's hash — in
`PREBUILT`, then in moecli's cache folder, and builds into the cache folder when neither has one
(another CPU, another jaxlib, a wheel built elsewhere, or no compiler at install time).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cc"))
HEADERS = sorted(CSRC.glob("*.h"))
VENDORED_FFI = CSRC / "vendor"          # xla/ffi/api/{api,c_api,ffi}.h as jaxlib ships them
FFI_HEADERS = ("xla/ffi/api/api.h", "xla/ffi/api/c_api.h", "xla/ffi/api/ffi.h")
PREBUILT = Path(__file__).parent / "prebuilt"   # where `pip install` puts the library it built

#: The target flags of each kind of build (MOECLI_CPU_ISA's values; see moecli.kernels.cpu.ffi).
ISAS = {"native": ["-march=native", "-mprefer-vector-width=512"], "avx2": ["-march=haswell"]}


def cpu_signature() -> str:
    """What -march=native compiles for: the CPU model and flags (a cache shared by machines must
    not hand one CPU's binary to another)."""
    try:
        info = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        return "\n".join(line for line in info.splitlines() if line.startswith(("model name", "flags")))
    except OSError:
        return platform.processor() or platform.machine()


def compiler() -> str:
    """$CXX, else g++ or c++; RuntimeError when there is none."""
    found = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not found:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    return found


def flags(isa: str) -> list[str]:
    return ["-O3", "-DNDEBUG", *ISAS[isa], "-std=c++17", "-fPIC"]


def library_name(isa: str, ffi_include: Path) -> str:
    """The library's file name: the ISA and a hash of everything the binary depends on (the FFI
    headers by content, not path, so an install-time build matches a run-time lookup)."""
    parts = [*(p.read_text() for p in SOURCES + HEADERS), *((ffi_include / h).read_text() for h in FFI_HEADERS),
             cpu_signature(), compiler(), *flags(isa)]
    return f"cpu_kernels-{isa}-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}.so"


def build(folder: Path, isa: str, ffi_include: Path) -> Path:
    """Compile the sources, one process per file in parallel (a build is mostly the compiler: ~15 s
    on two idle cores), link, and rename into `folder`: two processes building at once both succeed."""
    library = folder / library_name(isa, ffi_include)
    if library.exists():
        return library
    cxx, options = compiler(), [*flags(isa), f"-I{ffi_include}"]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        objects = [Path(tmp) / f"{source.stem}.o" for source in SOURCES]

        def run(args):
            result = subprocess.run([cxx, *args], capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                raise RuntimeError(f"building the CPU kernels failed: {result.stderr.strip()[-500:]}")

        with concurrent.futures.ThreadPoolExecutor(max(1, min(len(SOURCES), os.cpu_count() or 1))) as pool:
            list(pool.map(run, [[*options, "-c", str(s), "-o", str(o)] for s, o in zip(SOURCES, objects)]))
        built = Path(tmp) / library.name
        run([*options, "-shared", *map(str, objects), "-o", str(built)])
        built.replace(library)
    return library
