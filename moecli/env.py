"""Every `MOECLI_*` environment variable moecli reads, declared and read in this one module.

One convention for switches: `1`, `true`, `yes` or `on` turn one on; `0`, `false`, `no`, `off` or
unset leave it at its default; anything else is an error that names the variable. Nothing else in
moecli reads `os.environ` for a `MOECLI_` name (tests/test_layout.py checks it), and the README's
environment table lists exactly the variables below (checked too).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from moecli.errors import UsageError

TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Variable:
    name: str
    kind: str       # switch | path | text | int
    default: str    # as the README's table shows it
    meaning: str


VARIABLES = {v.name: v for v in (
    Variable("MOECLI_CACHE", "path", "~/.cache/moecli",
             "moecli's cache folder: compiled programs, CPU kernels, chat history, bench checkpoints"),
    Variable("MOECLI_MODEL", "path", "the bundled model", "the checkpoint used when no --model is given"),
    Variable("MOECLI_DEBUG", "switch", "off", "full tracebacks instead of one-line errors (as --debug)"),
    Variable("MOECLI_CPU_KERNELS", "switch", "on", "the C++ CPU kernels; off runs plain XLA on CPU"),
    Variable("MOECLI_CPU_BF16", "text", "the best the CPU has",
             "caps the engine for bfloat16 prompts on CPU: amx, dpbf16 or float32"),
    Variable("MOECLI_CPU_ISA", "text", "native",
             "what the CPU kernels are compiled for: native (this CPU) or avx2 (any x86 with AVX2, FMA and F16C)"),
    Variable("MOECLI_GPU_KERNELS", "switch", "off",
             "the Pallas GPU expert kernels (opt-in until bench/gpu.sh has measured them)"),
    Variable("MOECLI_NO_COMPILE_CACHE", "switch", "off", "leave JAX's persistent compilation cache off"),
    Variable("MOECLI_NO_MEMORY_CHECK", "switch", "off", "skip the up-front check that the weights fit"),
    Variable("MOECLI_COORDINATOR", "text", "unset", "multi-host: the coordinator's HOST:PORT (as --coordinator)"),
    Variable("MOECLI_NUM_PROCESSES", "int", "unset", "multi-host: how many processes (as --num-processes)"),
    Variable("MOECLI_PROCESS_ID", "int", "unset", "multi-host: this process's id (as --process-id)"),
    Variable("MOECLI_BENCH_COMPILE_CACHE", "switch", "off",
             "moe bench: use the persistent compilation cache (off: compile time is measured cold)"),
)}


_overrides: dict[str, str] = {}


def _raw(name: str) -> str | None:
    if name not in VARIABLES:
        raise KeyError(f"{name} is not declared in moecli.env.VARIABLES")
    return _overrides.get(name, os.environ.get(name))


def switch(name: str) -> bool:
    """A switch variable: True or False; its default ("on"/"off") when unset."""
    value = (_raw(name) or "").strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return value == "" and VARIABLES[name].default == "on"
    raise UsageError(f"{name}={_raw(name)!r} is not a switch", f"set {name} to 1 (on) or 0 (off), or unset it")


def override(name: str, value: str | None) -> None:
    """Let a command-line flag stand for a variable in this process (e.g. --debug for MOECLI_DEBUG),
    so code far from the CLI sees it; None drops the override (the environment decides again)."""
    _raw(name)
    if value is None:
        _overrides.pop(name, None)
    else:
        _overrides[name] = value


def text(name: str) -> str | None:
    """A text variable, or None when unset or empty."""
    value = _raw(name)
    return value if value else None


def path(name: str) -> Path | None:
    value = text(name)
    return Path(value).expanduser() if value else None


def integer(name: str) -> int | None:
    value = text(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} is not a whole number", f"set {name} to an integer") from None
