"""Which implementation of the model's operations runs, chosen once per `Model`.

    ops = select()          # for jax.default_backend(): "cpu", "gpu", "tpu", ...
    model = Model(config, params, ops=ops)   # recorded as model.ops; `moe generate --verbose` prints it

A backend is one entry of `BACKENDS`: a function returning the `moecli.model.ops.Ops` for that
platform. Adding a kernel path is one such function (or a change inside one); the model's modules
only ever call the `Ops` they were built with, and nothing reads global state while tracing.
Platforms without an entry run plain XLA (`moecli.model.ops.XLA`), the reference everything else
is tested against.
"""
from __future__ import annotations

import functools

import jax

from moecli.model.ops import XLA, Ops


def _cpu() -> Ops:
    from moecli.kernels.cpu.backend import cpu_ops

    return cpu_ops()


def _gpu() -> Ops:
    from moecli.kernels.gpu.backend import gpu_ops

    return gpu_ops()


BACKENDS = {"cpu": _cpu, "gpu": _gpu}


@functools.cache
def select(platform: str | None = None) -> Ops:
    """The operations for `platform` (default: JAX's default backend). Cached: the kernels are
    built, loaded and self-checked once per process."""
    platform = platform or jax.default_backend()
    return BACKENDS.get(platform, lambda: XLA)()


def describe(ops: Ops) -> str:
    """One line for `--verbose`: the backend's name and what it said about its kernels."""
    return "; ".join((f"backend: {ops.name}", *ops.notes))
