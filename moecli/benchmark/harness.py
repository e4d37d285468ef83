"""`moe bench`: load time, compile time, time to first token, prefill and decode speed, and peak
memory, for moecli and (with --compare-hf) Hugging Face transformers on the same files, and (with
--compare-llamacpp) llama.cpp on those files converted to GGUF (moecli/benchmark/llamacpp.py).

Each engine runs in its own subprocess (`python -m moecli.benchmark.harness ENGINE FOLDER DTYPE ...`), so
peak memory is its own and neither warms the other's caches; the parent collects one JSON line
from each. Named shapes are written once as random safetensors checkpoints at real sizes under
~/.cache/moecli/bench/, so both engines read identical files. With --threads N every engine's
process is restricted to the same N cores (`pin_threads`).

The decode floor at batch 1: every generated token reads each active weight once, so
tok/s <= memory bandwidth / active-weight bytes; see BENCHMARKS.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moecli import env

# Real model shapes (config.json fields); weights are random.
SHAPES: dict[str, dict] = {
    # ibm-granite/granite-3.1-1b-a400m-instruct's config.json: fused experts, multipliers, tied embeddings
    "granite-1b-a400m": dict(model_type="granitemoe", architectures=["GraniteMoeForCausalLM"], vocab_size=49155,
                             hidden_size=1024, intermediate_size=512, num_hidden_layers=24, num_attention_heads=16,
                             num_key_value_heads=8, num_local_experts=32, num_experts_per_tok=8,
                             embedding_multiplier=12.0, attention_multiplier=0.015625, residual_multiplier=0.22,
                             logits_scaling=6.0, tie_word_embeddings=True, rms_norm_eps=1e-6,
                             max_position_embeddings=131072, rope_theta=10000000.0, bos_token_id=0, eos_token_id=0,
                             pad_token_id=0),
    "olmoe-1b-7b": dict(model_type="olmoe", architectures=["OlmoeForCausalLM"], vocab_size=50304, hidden_size=2048,
                        intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                        num_experts=64, num_experts_per_tok=8, clip_qkv=None, norm_topk_prob=False),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], vocab_size=151936,
                          hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, tie_word_embeddings=False),
    "mixtral-8x7b": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=32000,
                         hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2),
    # openai/gpt-oss-20b's config.json; its experts MXFP4 as the Hub stores them (`random_weights`)
    "gpt-oss-20b": dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"], vocab_size=201088,
                        hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
                        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4,
                        experts_per_token=4, attention_bias=True, layer_types=["sliding_attention",
                        "full_attention"] * 12, sliding_window=128, initial_context_length=4096,
                        max_position_embeddings=131072, rope_theta=150000, rope_scaling=dict(
                            rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                            original_max_position_embeddings=4096), swiglu_limit=7.0, bos_token_id=199998,
                        eos_token_id=200002, pad_token_id=199999, quantization_config=dict(
                            quant_method="mxfp4", modules_to_not_convert=["model.layers.*.self_attn",
                            "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]), dtype="bfloat16"),
}
COMMON = dict(rms_norm_eps=1e-5, max_position_embeddings=4096, rope_theta=10000.0, hidden_act="silu",
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
METRICS = ("load_s", "compile_s", "ttft_s", "prefill_tok_s", "decode_tok_s", "peak_host_mb", "peak_device_mb")
EXTRA = ("load_peak_host_mb", "checkpoint_mb")
FLOOR = ("bandwidth_gb_s", "active_gb_per_token", "decode_floor_tok_s", "decode_of_floor")


def bench_dir() -> Path:
    from moecli.runtime import cache_dir

    return cache_dir() / "bench"


def shape_config(shape: str, dtype: str) -> dict:
    """The config.json of a named shape whose weights are stored in `dtype`, unless the shape fixes
    its own (gpt-oss-20b: bfloat16, as the Hub's checkpoint is; any --dtype loads it)."""
    dtype = SHAPES[shape].get("dtype", dtype)
    return {**COMMON, **SHAPES[shape], "torch_dtype": dtype, "dtype": dtype}


def write_synthetic(shape: str, dtype: str, folder: Path | None = None, shard_bytes: int = 1 << 30) -> Path:
    """Write a random checkpoint of a named shape (once; reused afterwards)."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from moecli.benchmark.random_weights import random_tensors
    from moecli.checkpoints.families import config_from_hf

    hf = shape_config(shape, dtype)
    dtype = hf["dtype"]
    folder = folder or bench_dir() / f"{shape}-{dtype}"
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    config = config_from_hf(hf)
    weight_map, shard, size, index = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, index
        if shard:
            index += 1
            save_file(shard, str(folder / f"model-{index:05d}.safetensors"))
            weight_map.update({n: f"model-{index:05d}.safetensors" for n in shard})
            shard, size = {}, 0

    for name, tensor in random_tensors(config, np_dtype):  # one at a time, as the Hub stores them
        shard[name] = tensor
        size += tensor.nbytes
        if size >= shard_bytes:
            flush()
    flush()
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return folder


def read_bandwidth_gb_s(gigabytes: float = 1.0) -> float:
    """The device's memory bandwidth as seen by the fastest streaming read we know: the best of a
    sum over a large array and a large matrix-vector product (on a 2-core CPU the sum runs on one
    core, the product on both)."""
    import jax
    import jax.numpy as jnp

    rows = 4096
    w = jnp.ones((rows, int(gigabytes * 2**30) // 4 // rows), jnp.float32)
    v = jnp.ones((1, rows), jnp.float32)
    best = 0.0
    for read in (jax.jit(jnp.sum), jax.jit(lambda w: v @ w)):
        read(w).block_until_ready()
        start = time.perf_counter()
        for _ in range(5):
            out = read(w)
        out.block_until_ready()
        best = max(best, w.nbytes * 5 / (time.perf_counter() - start) / 1e9)
    return best


def decode_floor(config, itemsize: int, bandwidth_gb_s: float) -> dict:
    """Batch-1 decoding reads every active weight once per token (the embedding table only one
    row, which `parameter_counts` leaves out of `active`), so tok/s <= bandwidth / active bytes.
    Float weights take `itemsize` bytes, packed ones (a checkpoint's MXFP4 experts) their own."""
    from moecli.model.sizes import parameter_counts, weight_bytes

    replicated, experts = weight_bytes(config, itemsize)
    chosen = config.top_k / config.n_experts if config.n_experts else 0.0
    active_bytes = replicated - parameter_counts(config).embedding * itemsize + experts * chosen
    return dict(bandwidth_gb_s=bandwidth_gb_s, active_gb_per_token=active_bytes / 1e9,
                decode_floor_tok_s=bandwidth_gb_s * 1e9 / active_bytes)


def checkpoint_mb(folder) -> float:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 2**20


def peak_host_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(vocab_size: int, prompt_len: int) -> np.ndarray:
    """The benchmark's prompt: the same random token ids for every engine."""
    return np.random.default_rng(1).integers(3, vocab_size, prompt_len)


def pin_threads(threads: int | None) -> int:
    """Restrict this process to its first `threads` cores (what `taskset` does), before an engine
    starts: XLA sizes its intra-op pool, which moecli's CPU kernels share, from this set, as OpenMP
    (torch, llama.cpp) does. None keeps every core. Returns the thread count."""
    cores = sorted(os.sched_getaffinity(0))
    if threads:
        os.sched_setaffinity(0, cores[:threads])
    return len(os.sched_getaffinity(0))


def moecli_quantizes() -> bool:
    """Whether the installed moecli can load a model quantized (`load_model(..., quantize=)`)."""
    import inspect

    from moecli.inference.engine import load_model

    return "quantize" in inspect.signature(load_model).parameters


# ----------------------------------------------------------------------------- the engines

def run_moecli(folder: str, dtype: str, prompt_len: int, new_tokens: int, quantize: str | None = None) -> dict:
    import jax

    from moecli.kernels.cpu import ffi as cpu_kernels
    from moecli.checkpoints.families import load_config
    from moecli.inference.engine import load_model
    from moecli.inference.decoder import Decoder
    from moecli.runtime import enable_compilation_cache
    from moecli.inference.sampling import SamplingParams

    if env.switch("MOECLI_BENCH_COMPILE_CACHE"):
        enable_compilation_cache()
    cpu_kernels.available()  # their one-time build (per machine) is neither loading nor compiling
    start = time.perf_counter()
    model = load_model(folder, dtype=dtype, **({"quantize": quantize} if quantize else {}))
    jax.block_until_ready(model.params)
    load_s, load_peak = time.perf_counter() - start, peak_host_mb()
    prompt = list(prompt_ids(model.config.vocab_size, prompt_len))
    decoder = Decoder(model, max_len=prompt_len + new_tokens + 16)
    greedy = SamplingParams()
    list(decoder.tokens(prompt, greedy, max_new_tokens=2))  # compile prefill + decode
    compile_s = decoder.compile_s
    decoder.reset()
    start = time.perf_counter()
    stamps = []
    for _ in decoder.tokens(prompt, greedy, max_new_tokens=new_tokens):
        stamps.append(time.perf_counter())
    ttft = stamps[0] - start
    stats = jax.devices()[0].memory_stats() or {}
    result = dict(load_s=load_s, compile_s=compile_s, ttft_s=ttft, prefill_tok_s=prompt_len / ttft,
                  decode_tok_s=(len(stamps) - 1) / (stamps[-1] - stamps[0]), peak_host_mb=peak_host_mb(),
                  peak_device_mb=stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None,
                  load_peak_host_mb=load_peak, checkpoint_mb=checkpoint_mb(folder),
                  device=str(jax.devices()[0].device_kind), version=f"jax {jax.__version__}")
    del model, decoder
    # bytes per weight; q8/q4 leave out their group scales, so the floor stays an upper bound
    itemsize = {"q8": 1, "q4": 0.5}.get(quantize, 4 if dtype == "float32" else 2)
    floor = decode_floor(load_config(folder), itemsize, read_bandwidth_gb_s())
    floor["decode_of_floor"] = result["decode_tok_s"] / floor["decode_floor_tok_s"]
    return {**result, **floor}


def run_transformers(folder: str, dtype: str, prompt_len: int, new_tokens: int) -> dict:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(device).eval()
    load_s, load_peak = time.perf_counter() - start, peak_host_mb()
    ids = torch.as_tensor(np.random.default_rng(1).integers(3, model.config.vocab_size, (1, prompt_len)),
                          device=device)

    class Clock:  # a streamer: generate() calls put() with the prompt, then once per new token
        def __init__(self):
            self.stamps = []

        def put(self, _):
            self.stamps.append(time.perf_counter())

        def end(self):
            pass

    def run(n):
        clock = Clock()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=clock,
                           pad_token_id=0)
        return start, clock.stamps[1:]

    warm_start, _ = run(2)
    compile_s = 0.0  # eager PyTorch: nothing to compile
    start, stamps = run(new_tokens)
    ttft = stamps[0] - start
    return dict(load_s=load_s, compile_s=compile_s, ttft_s=ttft, prefill_tok_s=prompt_len / ttft,
                decode_tok_s=(len(stamps) - 1) / (stamps[-1] - stamps[0]), peak_host_mb=peak_host_mb(),
                peak_device_mb=(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None,
                load_peak_host_mb=load_peak, checkpoint_mb=checkpoint_mb(folder), device=device, version=f"transformers {transformers.__version__}, torch {torch.__version__}")


def run_engine(engine: str, folder: Path, dtype: str, prompt_len: int, new_tokens: int, timeout: int,
               **options) -> dict:
    """Run one engine in a fresh subprocess and return its metrics. `folder` is a checkpoint folder
    (llamacpp: a GGUF file); options: threads=N (cores the engine may use), quantize="q8"|"q4"."""
    worker = "moecli.benchmark.llamacpp" if engine == "llamacpp" else "moecli.benchmark.harness"
    cmd = [sys.executable, "-m", worker, engine, str(folder), dtype, str(prompt_len), str(new_tokens)]
    cmd += [f"{key}={value}" for key, value in options.items() if value is not None]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        from moecli.errors import MoecliError

        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if proc.returncode < 0:  # a crash leaves no Python error to quote
            tail = f"its process died of signal {-proc.returncode} ({tail})"
        raise MoecliError(f"the {engine} benchmark failed: {tail}", "run with --debug, or try a smaller shape")
    return json.loads(lines[-1])


def ratios(ours: dict, theirs: dict) -> dict:
    return {"decode": ours["decode_tok_s"] / theirs["decode_tok_s"],
            "prefill": ours["prefill_tok_s"] / theirs["prefill_tok_s"]}


def paired_ratios(ours: list[dict], theirs: list[dict]) -> tuple[dict, dict]:
    """The median of the back-to-back pairs' ratios (moecli / competitor), and each pair's."""
    pairs = [ratios(a, b) for a, b in zip(ours, theirs)]
    each = {kind: [p[kind] for p in pairs] for kind in ("decode", "prefill")}
    return {kind: float(np.median(values)) for kind, values in each.items()}, each


def run_order(engines: tuple[str, ...], repeat: int) -> list[str]:
    """The engines' runs, in pairs that alternate who goes first (A B, B A, A B, ...): on a shared
    machine whose speed drifts, neither engine always gets the first or the second slot."""
    order = []
    for i in range(repeat):
        order += engines if i % 2 == 0 else engines[::-1]
    return order


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Each engine's median run (metric by metric), and the ratios. Against a competitor
    (transformers, llama.cpp), the ratio is the median of each pair's ratio: a pair ran back to
    back, so it saw the same machine. The decode floor is the machine's, not an engine's: a
    competitor's share of it is taken from its pair's moecli run, so the two shares bound the ratio
    (moecli's share / the competitor's share). transformers' ratios are `ratio` and `ratio_runs`,
    llama.cpp's are inside its own entry (None when moecli did not run)."""
    for competitor in ("transformers", "llamacpp"):
        for ours, theirs in zip(runs.get("moecli", []), runs.get(competitor, [])):
            if ours.get("decode_floor_tok_s"):
                theirs["decode_of_floor"] = theirs["decode_tok_s"] / ours["decode_floor_tok_s"]
    results = {}
    for engine, rs in runs.items():
        results[engine] = {key: (float(np.median([r[key] for r in rs])) if isinstance(value, (int, float))
                                 and not isinstance(value, bool) else value)
                           for key, value in rs[0].items()}
    if "transformers" in runs:
        results["ratio"], results["ratio_runs"] = paired_ratios(runs["moecli"], runs["transformers"])
    if "llamacpp" in runs:
        ratio, each = paired_ratios(runs["moecli"], runs["llamacpp"]) if runs.get("moecli") else (None, None)
        results["llamacpp"].update(ratio=ratio, ratio_runs=each)
    results["runs"] = runs
    return results


def worker_args(argv: list[str]) -> tuple[str, str, int, int, str | None, int]:
    """A worker's command line, ENGINE FOLDER DTYPE PROMPT_LEN NEW_TOKENS [threads=N] [quantize=q8|q4],
    as (folder, dtype, prompt_len, new_tokens, quantize, threads), this process pinned to its threads."""
    folder, dtype, prompt_len, new_tokens = argv[2:6]
    options = dict(arg.split("=", 1) for arg in argv[6:])
    threads = pin_threads(int(options["threads"]) if "threads" in options else None)
    return folder, dtype, int(prompt_len), int(new_tokens), options.get("quantize"), threads


if __name__ == "__main__":  # the worker: python -m moecli.benchmark.harness ENGINE FOLDER DTYPE PROMPT_LEN NEW_TOKENS ...
    folder, dtype, prompt_len, new_tokens, quantize, threads = worker_args(sys.argv)
    if sys.argv[1] == "moecli":
        result = run_moecli(folder, dtype, prompt_len, new_tokens, quantize)
    else:
        result = run_transformers(folder, dtype, prompt_len, new_tokens)
    print(json.dumps({**result, "threads": threads}))
