"""`moe bench`: moecli's speed and memory, optionally side by side with transformers."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from moecli.cli.app import command
from moecli.errors import UsageError


@command("bench")
def bench(
    model: str = typer.Argument(..., help="A checkpoint folder, or a shape: granite-1b-a400m, olmoe-1b-7b, "
                                          "qwen3-30b-a3b, mixtral-8x7b (random weights, written once)."),
    compare_hf: bool = typer.Option(False, "--compare-hf", help="Also run transformers on the same files."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights' dtype for both engines: float32 or bfloat16."),
    prompt_len: int = typer.Option(512, "--prompt-len", help="Prompt tokens for the prefill measurement."),
    new_tokens: int = typer.Option(128, "--new-tokens", help="Tokens decoded at batch 1."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the results to this JSON file."),
    timeout: int = typer.Option(3600, "--timeout", help="Seconds each engine may take."),
    repeat: int = typer.Option(1, "--repeat", help="Runs per engine, alternating the engines; reports "
                                                   "medians (a noisy machine wants 3 or more)."),
) -> None:
    """Measure load, compile, time to first token, prefill and decode speed, and peak memory."""
    from moecli.benchmark import harness as b

    if dtype not in ("float32", "bfloat16"):
        raise UsageError(f"--dtype must be float32 or bfloat16, got {dtype!r}", "pick one of the two")
    if prompt_len <= 0 or new_tokens < 2 or repeat < 1:
        raise UsageError("--prompt-len and --repeat must be positive, --new-tokens at least 2", "e.g. 512, 1 and 128")
    console = Console()
    if model in b.SHAPES:
        with console.status(f"writing random {model} weights ({dtype}) once ..."):
            folder = b.write_synthetic(model, dtype)
        source = f"{model} (random weights)"
    elif Path(model).is_dir():
        folder, source = Path(model), model
    else:
        raise UsageError(f"{model!r} is neither a checkpoint folder nor a known shape",
                         f"shapes: {', '.join(b.SHAPES)}")
    engines = ("moecli", "transformers") if compare_hf else ("moecli",)
    runs = {engine: [] for engine in engines}
    for i, engine in enumerate(b.run_order(engines, repeat)):
        with console.status(f"running {engine} ({i // len(engines) + 1} of {repeat}) ..."):
            runs[engine].append(b.run_engine(engine, folder, dtype, prompt_len, new_tokens, timeout))
    results = b.summarize(runs)
    results["setup"] = dict(model=source, dtype=dtype, prompt_len=prompt_len, new_tokens=new_tokens, repeat=repeat)
    console.print(results_table(results))
    if json_file:
        json_file.write_text(json.dumps(results, indent=2))


def results_table(results: dict) -> Table:
    from moecli.benchmark.harness import EXTRA, FLOOR, METRICS

    engines = [e for e in ("moecli", "transformers") if e in results]
    setup, repeat = results["setup"], results["setup"].get("repeat", 1)
    table = Table(title=f"{setup['model']} · {setup['dtype']} · prompt {setup['prompt_len']} · "
                        f"decode {setup['new_tokens']}" + (f" · median of {repeat} runs" if repeat > 1 else ""))
    table.add_column("metric")
    for engine in engines:
        table.add_column(engine, justify="right")
    if "ratio" in results:
        table.add_column("moecli / transformers", justify="right")
    for metric in METRICS + EXTRA:
        row = [metric] + [fmt(results[e].get(metric)) for e in engines]
        if "ratio" in results:
            kind = {"decode_tok_s": "decode", "prefill_tok_s": "prefill"}.get(metric)
            row.append(ratio_cell(results, kind) if kind else "")
        table.add_row(*row)
    for metric in FLOOR:
        if metric in results["moecli"]:
            table.add_row(metric, *[fmt(results[e][metric]) if metric in results[e] else "" for e in engines],
                          *([""] if "ratio" in results else []))
    table.add_row("device / versions", *[f"{results[e]['device']}, {results[e]['version']}" for e in engines],
                  *([""] if "ratio" in results else []))
    return table


def ratio_cell(results: dict, kind: str) -> str:
    """"1.95x", and with several pairs of runs their range: "1.95x (1.80-2.10)"."""
    cell, each = f"{results['ratio'][kind]:.2f}x", results.get("ratio_runs", {}).get(kind, [])
    return cell + (f" ({min(each):.2f}-{max(each):.2f})" if len(each) > 1 else "")


def fmt(value) -> str:
    return "-" if value is None else f"{value:,.2f}"
