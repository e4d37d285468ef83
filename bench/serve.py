"""Serving throughput: total decode tokens a second with 1, 4 and 16 concurrent clients (issue 23).

    python bench/serve.py --shape granite-1b-a400m --dtype float32 --clients 1,4,16 --tokens 64 --repeat 3

Builds (or reuses) the random-weight checkpoint of a `moe bench` shape, starts one `moecli.serve.scheduler`
(max_batch = the largest client count) and, for each client count, submits that many greedy requests
at once (distinct random prompts, so no prefix is reused): aggregate tok/s = all generated tokens / the
time from submission to the last token (prefills included, as the clients see it); decode tok/s = the
tokens generated while every request is decoding (from the last one's first token to the first one's
end) / that window: the batched decode loop's throughput.
Each count is run once untimed first (compiling its decode bucket). The same run times batch-1
decoding through `Decoder` (the `moe generate` path) for comparison with 1 client. Rounds alternate
the counts; medians of `--repeat` rounds are printed, with the CPU's vector flags.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moecli.benchmark.harness import pin_threads, prompt_ids, write_synthetic  # noqa: E402


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags)


def wave(scheduler, prompts: list[list[int]], tokens: int) -> tuple[float, float]:
    """Submit every prompt at once and wait for all: (aggregate tok/s: every token over the whole time,
    prefills included; decode tok/s: the tokens between the last request's first token and the first
    request's end, when every request is decoding, over that window)."""
    from moecli.inference.sampling import SamplingParams
    from moecli.serve.scheduler import Done, Request

    stamps: list[list[float]] = [[] for _ in prompts]
    ends: list[float] = []
    done = threading.Event()

    def on_event(i):
        def record(event):
            if isinstance(event, Done):
                ends.append(time.perf_counter())
                if len(ends) == len(prompts):
                    done.set()
            else:
                stamps[i].append(time.perf_counter())
        return record

    start = time.perf_counter()
    for i, p in enumerate(prompts):
        scheduler.submit(Request(p, SamplingParams(max_tokens=tokens), on_event(i)))
    done.wait()
    total = sum(len(s) for s in stamps)
    opened, closed = max(s[0] for s in stamps), min(s[-1] for s in stamps)
    inside = sum(1 for s in stamps for t in s if opened < t <= closed)
    return total / (max(ends) - start), inside / (closed - opened) if closed > opened else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="granite-1b-a400m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    pin_threads(args.threads)

    import jax
    import numpy as np

    from moecli.inference.decoder import Decoder
    from moecli.inference.engine import load_model
    from moecli.inference.sampling import SamplingParams
    from moecli.serve.scheduler import Scheduler

    counts = [int(c) for c in args.clients.split(",")]
    model = load_model(write_synthetic(args.shape, args.dtype), dtype=args.dtype, quantize=args.quantize)
    vocab, context = model.config.vocab_size, args.prompt_len + args.tokens + 16
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, vocab, args.prompt_len)) for _ in range(max(counts))]
    scheduler = Scheduler(model, max_batch=max(counts), context=context, prefix_cache_mb=0).start()
    decoder = Decoder(model, max_len=context)
    base = list(prompt_ids(vocab, args.prompt_len))

    def decoder_tok_s() -> float:
        decoder.reset()
        stamps = [time.perf_counter() for _ in decoder.tokens(base, SamplingParams(), max_new_tokens=args.tokens)]
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    decoder_tok_s()
    for n in counts:  # compile each bucket
        wave(scheduler, prompts[:n], 4)
    results = {n: [] for n in counts}
    alone = []
    for _ in range(args.repeat):
        alone.append(decoder_tok_s())
        for n in counts:
            results[n].append(wave(scheduler, prompts[:n], args.tokens))
    scheduler.close()
    summary = {}
    for k, kind in enumerate(("aggregate", "decode")):
        median = {n: statistics.median(r[k] for r in runs) for n, runs in results.items()}
        summary.update({f"{kind} tok/s, {n} clients": round(v, 2) for n, v in median.items()})
        summary.update({f"{kind}, {n} clients / {counts[0]}": round(median[n] / median[counts[0]], 2) for n in counts[1:]})
    summary["Decoder batch-1 decode tok/s"] = round(statistics.median(alone), 2)
    print(json.dumps({"shape": args.shape, "dtype": args.dtype, "quantize": args.quantize, "tokens": args.tokens,
                      "prompt_len": args.prompt_len, "repeat": args.repeat, "cpu_flags": cpu_flags(),
                      "threads": args.threads, "jax": jax.__version__, **summary}, indent=1))


if __name__ == "__main__":
    main()
