"""How much quantization costs the bundled model: held-out loss per token with bfloat16, q8 and q4
weights (`moecli.model.quant`), against the issue's bounds (q8 within 0.5% of bf16, q4 within 3%).

The text is that of bench/context_eval.py: stretches of the four held-out plays, encoded as `moe
train` does; each variant predicts the same targets in 256-token windows (the model's training
length). The comparison is paired, so the standard error is that of the per-stretch differences.

    MOECLI_CACHE=/tmp/moecache python bench/quant_quality.py            # README's and BENCHMARKS.md's table
    python bench/quant_quality.py --chunks 8 --json /tmp/quant.json     # quicker
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from context_eval import held_out_chunks, token_losses  # noqa: E402

from moecli import load_model  # noqa: E402

MODEL = ROOT / "weights" / "bardmoe"
BOUNDS = {"q8": 0.005, "q4": 0.03}   # the largest relative loss increase over bfloat16 allowed


def evaluate(n_chunks: int, length: int = 256) -> dict:
    chunks = held_out_chunks(MODEL, n_chunks)
    per_chunk = {}
    for name, kwargs in (("float32", {"dtype": "float32"}), ("bfloat16", {"dtype": "bfloat16"}),
                         ("q8", {"dtype": "float32", "quantize": "q8"}), ("q4", {"dtype": "float32", "quantize": "q4"})):
        per_chunk[name] = token_losses(load_model(MODEL, **kwargs), chunks, length).mean(axis=1)
        print(f"{name}: {per_chunk[name].mean():.4f}", file=sys.stderr)
    base = per_chunk["bfloat16"]
    results = {}
    for name, losses in per_chunk.items():
        diff = losses - base
        results[name] = {"loss": float(losses.mean()), "vs_bf16": float(diff.mean() / base.mean()),
                         "se": float(diff.std(ddof=1) / np.sqrt(len(diff)) / base.mean())}
        if name in BOUNDS:
            results[name]["bound"] = BOUNDS[name]
            results[name]["met"] = results[name]["vs_bf16"] <= BOUNDS[name]
    return results


def markdown(results: dict, n_chunks: int) -> str:
    rows = ["| weights | held-out loss (nats/token) | vs bfloat16 | bound | met |", "|---|---:|---:|---:|:-:|"]
    for name, r in results.items():
        bound = f"≤ {r['bound']:.1%}" if "bound" in r else ""
        met = ("yes" if r["met"] else "**no**") if "met" in r else ""
        rows.append(f"| {name} | {r['loss']:.4f} | {r['vs_bf16']:+.2%} ± {r['se']:.2%} | {bound} | {met} |")
    return "\n".join(rows) + f"\n\n({n_chunks} stretches of 1,024 held-out tokens in 256-token windows)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = evaluate(args.chunks)
    print(markdown(results, args.chunks))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
