"""How fast do the quantized decoding kernels stream their weights, per vector path?

Decoding is bound by how fast the weights come from memory, so the figure of merit is GB/s of the
bytes a kernel must read: packed weights plus their float16 scales for `matvec_q` / `experts_q`
(q8: ~1.06 bytes a weight at G = 32, q4: ~0.56), the weights themselves for the float32 and
bfloat16 `matvec` / `experts` they are compared with. Two shapes:

- dense: x [1, 2048] @ W [2048, 2048];
- experts: one token through granite-1b-a400m's experts (d 1024, f 512, 32 experts, top-8): the
  8 chosen experts' gate, up and down matrices.

The weights are spread over enough copies (--mb of them per kind, more than the L3 cache: 480 MiB on
the development VM) that each call reads from memory, as decoding a real model does; `--steps`
calls are chained in one jitted program (each call's input the previous output), so dispatch is
paid once per chain. Each vector path (MOECLI_CPU_ISA: native, and avx2 where the CPU runs it) is
its own process; the machine is shared and noisy, so the processes alternate over `--rounds`,
and within each the kinds alternate over `--repeats`; the table shows medians.

    MOECLI_CACHE=/tmp/moecache python bench/quant_kernels.py
    python bench/quant_kernels.py --rounds 5 --json /tmp/quant.json

`--prefill` measures prompts instead: a 512-token prompt (float32 activations) through one
granite-1b-a400m-shaped layer's quantized products (q, k, v, o projections [1024 -> 1024, 512,
512, 1024] and the experts, routed by a random router: ragged tokens per expert), q8 and q4, on
the reference path (dequantize, then XLA's dot and `experts_blocked`, which quantized float32
prompts took before) and on the kernels (`matmul_q` / `experts_q` on the float32 engine),
alternating `--rounds` times in one process per vector path; per-pair ratios, within one run.
`--checkpoint FOLDER` times a whole model's prefill (to its first token) the same way instead.

    python bench/quant_kernels.py --prefill --rounds 3
    python bench/quant_kernels.py --prefill --checkpoint /tmp/moecache/bench/granite-1b-a400m-float32
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GROUP = 32
DENSE = (2048, 2048)
GRANITE = {"d": 1024, "f": 512, "experts": 32, "top_k": 8}
KINDS = ("float32", "bfloat16", "q8", "q4")


def weights(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """The operands of one matrix (or stack) [..., k, n] of `kind`, random."""
    import ml_dtypes

    *lead, k, n = shape
    if kind in ("float32", "bfloat16"):
        dtype = np.float32 if kind == "float32" else ml_dtypes.bfloat16
        return ((rng.standard_normal(shape, np.float32) / np.sqrt(k)).astype(dtype),)
    q = (rng.integers(-128, 128, size=shape, dtype=np.int8) if kind == "q8"
         else rng.integers(0, 256, size=(*lead, k // 2, n), dtype=np.uint8))
    scale = np.full((*lead, k // GROUP, n), 1 / (64 * np.sqrt(k)), np.float16)
    return q, scale


def bytes_read(operands: tuple[np.ndarray, ...], fraction: float = 1.0) -> float:
    return fraction * sum(a.nbytes for a in operands)


def chain(step, steps: int):
    """A jitted program of `steps` calls of step(x, i, *operands_i), each on its own operands, each
    call's input the previous call's output (scaled back to at most 1, so nothing overflows)."""
    import jax
    import jax.numpy as jnp

    def run(x, *operands):
        per = len(operands) // steps
        for i in range(steps):
            y = step(x, i, *operands[i * per:(i + 1) * per])
            x = y / (jnp.max(jnp.abs(y)) + 1)
        return x
    return jax.jit(run)


def setups(mb: float, steps: int, rng: np.random.Generator):
    """{(shape, kind): (program, x, operands of each chain, bytes read per chain)}, each kind's
    copies at least `mb` MB in all."""
    import jax.numpy as jnp

    from moecli.kernels.cpu import ffi

    out = {}
    k = DENSE[0]
    for kind in KINDS:
        one = weights(kind, DENSE, rng)
        copies = max(steps, int(np.ceil(mb * 2 ** 20 / bytes_read(one) / steps)) * steps)
        operands = [tuple(jnp.array(a) for a in one) for _ in range(copies)]
        matvec = ffi.matvec if len(one) == 1 else ffi.matvec_q
        program = chain(lambda x, i, *w, f=matvec: f(x, *w).astype(jnp.float32), steps)
        out["dense", kind] = (program, jnp.ones((1, k), jnp.float32), operands, steps * bytes_read(one))
    d, f, e, top_k = GRANITE["d"], GRANITE["f"], GRANITE["experts"], GRANITE["top_k"]
    # One token, top_k experts a call; calls cycle through disjoint sets of experts of each stack.
    ids = [jnp.arange(i * top_k, (i + 1) * top_k, dtype=jnp.int32)[None] for i in range(e // top_k)]
    gates = jnp.full((1, top_k), 1 / top_k, jnp.float32)
    for kind in KINDS:
        layer = weights(kind, (e, d, f), rng) + weights(kind, (e, d, f), rng) + weights(kind, (e, f, d), rng)
        per_call = bytes_read(layer, top_k / e)
        layers = max(1, int(np.ceil(mb * 2 ** 20 / bytes_read(layer))))
        stacks = [tuple(jnp.array(a) for a in layer) for _ in range(layers)]
        calls = steps * int(np.ceil(layers * (e // top_k) / steps))
        operands = [stacks[(c // (e // top_k)) % layers] for c in range(calls)]
        experts = ffi.experts if kind in ("float32", "bfloat16") else ffi.experts_q
        program = chain(lambda x, i, *w, f=experts: f(x, ids[i % len(ids)], gates, *w).astype(jnp.float32), steps)
        out["experts", kind] = (program, jnp.ones((1, d), jnp.float32), operands, steps * per_call)
    return out


def worker(args) -> None:
    """One process, one vector path: GB/s of every (shape, kind), `repeats` times, kinds alternating."""
    import jax

    from moecli.kernels.cpu import ffi

    assert ffi.available(), ffi.status()
    rng = np.random.default_rng(0)
    results: dict[str, list[float]] = {}
    for shape in ("dense", "experts"):  # one shape's weights in memory at a time
        cases = {key: value for key, value in setups(args.mb, args.steps, rng).items() if key[0] == shape}
        for program, x, operands, _ in cases.values():  # compile, and touch every copy once
            for start in range(0, len(operands), args.steps):
                jax.block_until_ready(program(x, *[a for ops in operands[start:start + args.steps] for a in ops]))
        for _ in range(args.repeats):
            for (shape_, kind), (program, x, operands, chain_bytes) in cases.items():
                chains = [[a for ops in operands[s:s + args.steps] for a in ops]
                          for s in range(0, len(operands), args.steps)]
                begin = time.perf_counter()
                for flat in chains:
                    x = program(x, *flat)
                jax.block_until_ready(x)
                seconds = time.perf_counter() - begin
                results.setdefault(f"{shape_} {kind}", []).append(len(chains) * chain_bytes / seconds / 1e9)
        del cases
    print(json.dumps({"isa": ffi.cpu_isa(), "gbps": results}))


PREFILL = {"tokens": 512, "projections": (1024, 512, 512, 1024), **GRANITE}


def reference_ops():
    """The CPU backend's operations as they were before quantized float32 prompts ran in C++ (the
    "before" of --prefill): such prompts dequantized, then XLA's dot and `experts_blocked`."""
    import dataclasses
    import math

    import jax.numpy as jnp

    from moecli.kernels.cpu import backend, ffi
    from moecli.model import experts as E
    from moecli.model.quant import QuantizedWeight

    def detour(x) -> bool:  # a prompt's rows in float32
        return math.prod(x.shape[:-1]) > ffi.DECODE_ROWS and x.dtype == jnp.float32

    def matmul(x, w, out_dtype=None):
        reference = isinstance(w, QuantizedWeight) and detour(x)
        return (backend.matmul_xla if reference else backend.matmul_kernel)(x, w, out_dtype)

    def experts_q(x, *args, **kwargs):
        return (E.experts_blocked if detour(x) else backend.experts_kernel_q)(x, *args, **kwargs)

    def pick(*args):
        chosen = backend.pick_experts(*args)
        return experts_q if chosen is backend.experts_kernel_q else chosen

    return dataclasses.replace(backend.cpu_ops(), name="cpu-kernels-before", matmul=matmul, experts=pick)


def layer_programs(kind: str, rng: np.random.Generator):
    """(before, after): PREFILL's layer in `kind` (q8, q4) on a random prompt, each a function of
    no arguments giving every product's result, on `reference_ops()` and on the kernels."""
    import jax
    import jax.numpy as jnp

    from moecli.kernels.cpu import backend
    from moecli.model.quant import QuantizedWeight
    from moecli.model.router import Routing, route

    t, d, f, e, top_k = (PREFILL[key] for key in ("tokens", "d", "f", "experts", "top_k"))
    shapes = [(d, n) for n in PREFILL["projections"]] + [(e, d, f), (e, d, f), (e, f, d)]
    operands = [jnp.array(a) for shape in shapes for a in weights(kind, shape, rng)]
    router = jnp.array(rng.standard_normal((d, e), np.float32))
    x = jnp.array(rng.standard_normal((t, d), np.float32))

    def layer(ops):
        def run(x, *flat):
            ws = [QuantizedWeight(*flat[i:i + 2]) for i in range(0, len(flat), 2)]
            r = route(x[None], router, top_k, renormalise=True)
            routing = Routing(r.experts[0], r.weights[0], None)                  # [tokens, top_k]
            experts = ops.experts(t, top_k, e, ws[4].q.dtype)
            return [ops.matmul(x, w) for w in ws[:4]] + [experts(x, *ws[4:], routing, e)]
        program = jax.jit(run)
        return lambda: program(x, *operands)

    return layer(reference_ops()), layer(backend.cpu_ops())


def model_programs(kind: str, checkpoint: Path):
    """(before, after): the first token of PREFILL's prompt (random ids) through the model at
    `checkpoint` loaded in float32 and quantized to `kind`, as `moe bench` times it (its ttft)."""
    from moecli.benchmark.harness import prompt_ids
    from moecli.inference.decoder import Decoder
    from moecli.inference.engine import Model, load_model
    from moecli.inference.sampling import SamplingParams

    loaded = load_model(checkpoint, dtype="float32", quantize=kind)
    prompt = [int(i) for i in prompt_ids(loaded.config.vocab_size, PREFILL["tokens"])]

    def first_token(ops):
        decoder = Decoder(Model(loaded.config, loaded.params, mesh=loaded.mesh, ops=ops), max_len=len(prompt) + 16)

        def run():
            decoder.reset()
            return list(decoder.tokens(prompt, SamplingParams(), max_new_tokens=1))
        return run

    return first_token(reference_ops()), first_token(loaded.ops)


def prefill_worker(args) -> None:
    """One process, one vector path: seconds of the prefill, before and after, alternating."""
    import jax

    from moecli.kernels.cpu import ffi

    assert ffi.available(), ffi.status()
    rng = np.random.default_rng(0)
    results = {}
    for kind in ("q8", "q4"):
        programs = model_programs(kind, args.checkpoint) if args.checkpoint else layer_programs(kind, rng)
        outputs = [jax.block_until_ready(program()) for program in programs]  # compile, and compare
        error = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
                          / max(np.max(np.abs(np.asarray(b, np.float64))), 1e-30))
                    for a, b in zip(jax.tree.leaves(outputs[1]), jax.tree.leaves(outputs[0])))
        seconds = {"before": [], "after": []}
        for _ in range(args.rounds):
            for name, program in zip(seconds, programs):
                begin = time.perf_counter()
                jax.block_until_ready(program())
                seconds[name].append(time.perf_counter() - begin)
        results[kind] = {"seconds": seconds, "max_rel_diff": error}
        del programs
    print(json.dumps({"isa": ffi.cpu_isa(), "engine": ffi.bf16_engine(), "prefill": results}))


def prefill_table(results: dict[str, dict], checkpoint: Path | None) -> None:
    """The --prefill results of each vector path as a table, with every pair's ratio."""
    tokens = PREFILL["tokens"]
    what = f"the model at {checkpoint} (to its first token)" if checkpoint else \
        "one granite-1b-a400m-shaped layer's quantized products"
    print(f"{tokens}-token prompt, float32 activations, {what}: tok/s (before = reference path, "
          "after = kernels), runs in order; max rel diff: after against before")
    print("| path | weights | before tok/s | after tok/s | after / before, each pair | median | max rel diff |")
    print("| --- | --- | --- | --- | --- | ---: | ---: |")
    for path, result in results.items():
        for kind, r in result["prefill"].items():
            before, after = r["seconds"]["before"], r["seconds"]["after"]
            ratios = [b / a for b, a in zip(before, after)]
            print(f"| {path} ({result['isa']}) | {kind} | " + ", ".join(f"{tokens / s:.0f}" for s in before)
                  + " | " + ", ".join(f"{tokens / s:.0f}" for s in after) + " | "
                  + ", ".join(f"{q:.2f}x" for q in ratios) + f" | {statistics.median(ratios):.2f}x"
                  + f" | {r['max_rel_diff']:.1e} |")


def run_worker(path: str, *options: str) -> dict:
    """This script's worker (`options` after --worker) in a fresh process for the vector path `path`: its JSON."""
    command = [sys.executable, __file__, "--worker", *options]
    out = subprocess.run(command, env={**os.environ, "MOECLI_CPU_ISA": path}, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        sys.exit(f"{path}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="processes per vector path, alternating")
    parser.add_argument("--repeats", type=int, default=5, help="measurements of every kind per process")
    parser.add_argument("--steps", type=int, default=8, help="calls chained in one jitted program")
    parser.add_argument("--mb", type=float, default=768, help="MB of weight copies per kind (more than the L3)")
    parser.add_argument("--json", type=Path, help="also write the samples here")
    parser.add_argument("--prefill", action="store_true", help="prompts: reference path vs kernels, float32")
    parser.add_argument("--checkpoint", type=Path, help="--prefill: this model's whole prefill, not one layer")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return prefill_worker(args) if args.prefill else worker(args)

    from moecli.kernels.cpu import ffi

    paths = ["native"] + ["avx2"] * ffi.supports_avx2()
    samples: dict[str, dict[str, list[float]]] = {path: {} for path in paths}
    isas = {}
    if args.prefill:  # one process per path, the rounds alternating inside it
        model = ("--checkpoint", str(args.checkpoint)) if args.checkpoint else ()
        prefill = {path: run_worker(path, "--prefill", "--rounds", str(args.rounds), *model) for path in paths}
        prefill_table(prefill, args.checkpoint)
        if args.json:
            args.json.write_text(json.dumps(prefill, indent=1))
        return
    for round_ in range(args.rounds):
        for path in paths:
            result = run_worker(path, "--repeats", str(args.repeats), "--steps", str(args.steps), "--mb", str(args.mb))
            isas[path] = result["isa"]
            for key, values in result["gbps"].items():
                samples[path].setdefault(key, []).extend(values)
            print(f"round {round_ + 1}/{args.rounds}: {path} done", file=sys.stderr)
    print(f"GB/s of weights (+ scales) read, median of {args.rounds} x {args.repeats}; "
          f"q8/q4 group size {GROUP}")
    print("| shape | weights | " + " | ".join(f"{p} ({isas[p]})" for p in paths) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in paths) + " |")
    for key in samples[paths[0]]:
        shape, kind = key.split()
        print(f"| {shape} | {kind} | " + " | ".join(f"{statistics.median(samples[p][key]):.1f}" for p in paths) + " |")
    if args.json:
        args.json.write_text(json.dumps({"isas": isas, "samples": samples}, indent=1))


if __name__ == "__main__":
    main()
