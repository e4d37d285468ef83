"""One MoE layer on a GPU, at the shapes of issue 6: decoding one token with the Pallas kernel
against the pure-JAX scan and the HBM floor (the issue's H200 measured, for the same layer:
gathering the k experts 735 / 256 µs at Mixtral / Qwen3-30B, ragged_dot 880 / 565, the floor
~164 / ~18), and a 512-token prompt with the grouped kernel against the scan of dense blocks.

    python bench/gpu_layer.py            # on the GPU (bench/gpu.sh runs it)
    python bench/gpu_layer.py --small    # a smoke test anywhere: tiny shapes, the kernel interpreted
"""
from __future__ import annotations

import functools
import json
import sys
import time

import jax
import jax.numpy as jnp

from moecli.kernels.gpu import pallas as gpu_kernels
from moecli.kernels.gpu.backend import experts_grouped
from moecli.model.experts import experts_blocked, experts_scanned
from moecli.model.router import Routing

SHAPES = {"mixtral-8x7b": (8, 2, 4096, 14336), "qwen3-30b-a3b": (128, 8, 2048, 768),
          "olmoe-1b-7b": (64, 8, 2048, 1024)}  # experts, top_k, d_model, expert FFN


def best_time_s(fn, *args, repeat: int = 50) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def bandwidth_gb_s(gigabytes: float = 2.0) -> float:
    """A streaming copy's bandwidth (bytes read plus written), the same kind of figure as the floor's."""
    x = jnp.ones((int(gigabytes * 2**30) // 4,), jnp.float32)
    return 2 * x.nbytes / best_time_s(jax.jit(lambda a: a * 1.0001), x, repeat=10) / 1e9


def main(small: bool) -> None:
    shapes = {"small": (6, 2, 64, 96)} if small else SHAPES
    experts_kernel = functools.partial(gpu_kernels.experts, interpret=small)
    if small:  # the prompt path calls gpu_kernels.grouped_matmul: interpret it too
        gpu_kernels.grouped_matmul = functools.partial(gpu_kernels.grouped_matmul, interpret=True)
    prompt_len = 20 if small else 512
    bandwidth = bandwidth_gb_s(0.01 if small else 2.0)
    results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "bandwidth_gb_s": bandwidth,
               "kernel_self_check": gpu_kernels.self_check() or "passed"}
    for name, (n_experts, top_k, d, f) in shapes.items():
        keys = jax.random.split(jax.random.PRNGKey(0), 4)
        w_gate, w_up = (jax.random.normal(k, (n_experts, d, f), jnp.bfloat16) * 0.02 for k in keys[:2])
        w_down = jax.random.normal(keys[2], (n_experts, f, d), jnp.bfloat16) * 0.02
        x = jax.random.normal(keys[3], (1, d), jnp.bfloat16)
        ids = jnp.arange(top_k, dtype=jnp.int32)[None] * (n_experts // top_k)
        gates = jnp.full((1, top_k), 1.0 / top_k, jnp.float32)
        kernel = jax.jit(lambda x, ids, g, *w: experts_kernel(x, ids, g, *w))
        scan = jax.jit(lambda x, ids, g, *w: experts_scanned(x, *w, Routing(ids, g, None), n_experts))
        args = (x, ids, gates, w_gate, w_up, w_down)
        got, want = kernel(*args).astype(jnp.float32), scan(*args).astype(jnp.float32)
        floor_s = top_k * 3 * d * f * 2 / (bandwidth * 1e9)
        row = {"kernel_us": best_time_s(kernel, *args) * 1e6, "scan_us": best_time_s(scan, *args) * 1e6,
               "floor_us": floor_s * 1e6, "max_abs_diff": float(jnp.max(jnp.abs(got - want)))}
        row["kernel_of_floor"] = row["floor_us"] / row["kernel_us"]
        row["scan_of_floor"] = row["floor_us"] / row["scan_us"]
        xp = jax.random.normal(keys[3], (prompt_len, d), jnp.bfloat16)
        ids_p = jax.random.randint(keys[0], (prompt_len, top_k), 0, n_experts, jnp.int32)
        routing = Routing(ids_p, jnp.full((prompt_len, top_k), 1.0 / top_k, jnp.float32), None)
        grouped = jax.jit(lambda x, r, *w: experts_grouped(x, *w, r, n_experts))
        blocked = jax.jit(lambda x, r, *w: experts_blocked(x, *w, r, n_experts))
        flops = prompt_len * top_k * 3 * 2 * d * f
        row["prompt_kernel_ms"] = best_time_s(grouped, xp, routing, w_gate, w_up, w_down, repeat=10) * 1e3
        row["prompt_scan_ms"] = best_time_s(blocked, xp, routing, w_gate, w_up, w_down, repeat=10) * 1e3
        row["prompt_kernel_tflop_s"] = flops / row["prompt_kernel_ms"] / 1e9
        prompt_args = (xp, routing, w_gate, w_up, w_down)
        row["prompt_max_abs_diff"] = float(jnp.max(jnp.abs(grouped(*prompt_args).astype(jnp.float32)
                                                           - blocked(*prompt_args).astype(jnp.float32))))
        results[name] = row
        print(name, json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main("--small" in sys.argv)
