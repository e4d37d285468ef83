"""`moe bench`: moecli's speed and memory, optionally side by side with transformers and llama.cpp."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from moecli.cli.app import command
from moecli.errors import UsageError


@command("bench")
def bench(
    model: str = typer.Argument(..., metavar="MODEL", help="A checkpoint folder, or a shape: granite-1b-a400m, "
                                "olmoe-1b-7b, qwen3-30b-a3b, mixtral-8x7b, gpt-oss-20b (random weights, written once; "
                                "gpt-oss-20b's experts MXFP4 as the Hub stores them)."),
    compare_hf: bool = typer.Option(False, "--compare-hf", help="Also run transformers on the same files."),
    compare_llamacpp: bool = typer.Option(False, "--compare-llamacpp", help="Also run llama.cpp (`pip install "
                                          "moecli[bench]`) on the same weights as GGUF: F32, BF16, or Q8_0 / Q4_0 "
                                          "with --quantize."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="moecli's weights as q8 or q4 integers "
                                           "(llama.cpp's Q8_0 or Q4_0 with --compare-llamacpp)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Cores each engine may use "
                                          "[default: all of this process's]."),
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
    cores = len(os.sched_getaffinity(0))
    check_llamacpp_options(compare_hf, compare_llamacpp, quantize, threads, cores)
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
    moecli_runs = not quantize or b.moecli_quantizes()  # else llama.cpp runs alone: "moecli: not available"
    if not moecli_runs and not compare_llamacpp:
        raise UsageError("this moecli cannot quantize yet (its load_model has no quantize=)",
                         "drop --quantize, or add --compare-llamacpp to time llama.cpp's Q8_0 / Q4_0 alone")
    engines = tuple(e for e, on in (("moecli", moecli_runs), ("transformers", compare_hf),
                                    ("llamacpp", compare_llamacpp)) if on)
    targets = dict.fromkeys(engines, folder)
    precision = quantize or dtype
    if compare_llamacpp:
        from moecli.benchmark import llamacpp

        with console.status(f"converting the weights to GGUF {llamacpp.PRECISIONS[precision]} once ..."):
            targets["llamacpp"] = llamacpp.gguf(folder, precision, dtype, threads or cores)
    options = {key: value for key, value in dict(threads=threads, quantize=quantize).items() if value is not None}
    runs = {engine: [] for engine in engines}
    for i, engine in enumerate(b.run_order(engines, repeat)):
        with console.status(f"running {engine} ({i // len(engines) + 1} of {repeat}) ..."):
            runs[engine].append(b.run_engine(engine, targets[engine], dtype, prompt_len, new_tokens, timeout,
                                             **options))
    results = b.summarize(runs)
    if not moecli_runs:
        results["moecli"] = dict(available=False, reason=f"moecli: not available ({quantize} needs a moecli "
                                                         "whose load_model takes quantize=)")
    if compare_llamacpp:  # one entry per precision, so the JSON of several runs merges
        results["llamacpp"] = {precision: dict(gguf_type=llamacpp.PRECISIONS[precision], **results["llamacpp"])}
    results["setup"] = dict(model=source, dtype=dtype, prompt_len=prompt_len, new_tokens=new_tokens, repeat=repeat,
                            quantize=quantize, threads=threads or cores)
    console.print(results_table(results))
    if json_file:
        json_file.write_text(json.dumps(results, indent=2))


def check_llamacpp_options(compare_hf: bool, compare_llamacpp: bool, quantize, threads, cores: int) -> None:
    """--quantize, --threads and --compare-llamacpp's own checks; llama-cpp-python's presence is
    checked here, before any weights are written."""
    if quantize not in (None, "q8", "q4"):
        raise UsageError(f"--quantize must be q8 or q4, got {quantize!r}", "pick one of the two, or leave it out")
    if quantize and compare_hf:
        raise UsageError("--quantize has no transformers counterpart", "drop --compare-hf, or use --compare-llamacpp")
    if threads is not None and not 1 <= threads <= cores:
        raise UsageError(f"--threads must be between 1 and {cores} (the cores this process may use), got {threads}",
                         f"e.g. --threads {cores}")
    if compare_llamacpp:
        from moecli.benchmark.llamacpp import require

        require()


def results_table(results: dict) -> Table:
    from moecli.benchmark.harness import EXTRA, FLOOR, METRICS

    columns, competitors = engine_columns(results), ratio_columns(results)
    setup, repeat = results["setup"], results["setup"].get("repeat", 1)
    table = Table(title=f"{setup['model']} · {setup['dtype']}" + (f" {setup['quantize']}" if setup.get("quantize") else "")
                        + f" · prompt {setup['prompt_len']} · decode {setup['new_tokens']}"
                        + (f" · {setup['threads']} threads" if setup.get("threads") else "")
                        + (f" · median of {repeat} runs" if repeat > 1 else ""))
    table.add_column("metric")
    for header in [header for header, _ in columns] + [header for header, _, _ in competitors]:
        table.add_column(header, justify="right")
    blank = [""] * len(competitors)
    for metric in METRICS + EXTRA:
        kind = {"decode_tok_s": "decode", "prefill_tok_s": "prefill"}.get(metric)
        table.add_row(metric, *[fmt(m.get(metric)) for _, m in columns],
                      *[ratio_cell(ratio, each, kind) if kind else "" for _, ratio, each in competitors])
    for metric in FLOOR:
        if any(metric in m for _, m in columns):
            table.add_row(metric, *[fmt(m[metric]) if metric in m else "" for _, m in columns], *blank)
    table.add_row("device / versions", *[m.get("reason") or f"{m['device']}, {m['version']}" for _, m in columns],
                  *blank)
    return table


def engine_columns(results: dict) -> list[tuple[str, dict]]:
    """(header, median metrics) of each engine: moecli, transformers, llama.cpp's GGUF type."""
    columns = [(engine, results[engine]) for engine in ("moecli", "transformers") if engine in results]
    return columns + [(f"llama.cpp {s['gguf_type']}", s) for s in results.get("llamacpp", {}).values()]


def ratio_columns(results: dict) -> list[tuple[str, dict, dict]]:
    """(header, median ratios, each pair's ratios) of each competitor moecli was timed against."""
    columns = [("moecli / transformers", results["ratio"], results.get("ratio_runs", {}))] if "ratio" in results else []
    return columns + [("moecli / llama.cpp", s["ratio"], s["ratio_runs"])
                      for s in results.get("llamacpp", {}).values() if s.get("ratio")]


def ratio_cell(ratio: dict, each: dict, kind: str) -> str:
    """"1.95x", and with several pairs of runs their range: "1.95x (1.80-2.10)"."""
    cell, each = f"{ratio[kind]:.2f}x", each.get(kind, [])
    return cell + (f" ({min(each):.2f}-{max(each):.2f})" if len(each) > 1 else "")


def fmt(value) -> str:
    return "-" if value is None else f"{value:,.2f}"
