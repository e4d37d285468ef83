"""`moe generate`: one prompt in, the reply streamed to stdout."""
from __future__ import annotations

import dataclasses
import sys
from typing import List, Optional

import typer

from moecli.cli import command
from moecli.commands import options as opt
from moecli.errors import UsageError


@command("generate")
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt; - reads it from stdin."),
    model: Optional[str] = opt.Model, revision: Optional[str] = opt.Revision,
    max_tokens: int = opt.MaxTokens, temperature: float = opt.Temperature, top_p: float = opt.TopP,
    top_k: int = opt.TopK, min_p: float = opt.MinP, repetition_penalty: float = opt.RepetitionPenalty,
    seed: int = opt.Seed, system: Optional[str] = opt.System, stop: Optional[List[str]] = opt.Stop,
    no_chat_template: bool = typer.Option(False, "--no-chat-template",
                                          help="Continue the prompt as raw text, even for a chat model."),
    dtype: str = opt.Dtype, context: int = opt.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print timing and memory statistics to stderr."),
) -> None:
    """Generate a reply to --prompt and stream it to stdout."""
    from moecli.api import GenerationStats, load, stream_generate

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty", "pass some text with --prompt (or - to read stdin)")
    if max_tokens <= 0:
        raise UsageError(f"--max-tokens must be positive, got {max_tokens}", "pass --max-tokens 1 or more")
    params = opt.sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed)
    m, tokenizer = load(opt.model_source(model), dtype=dtype, revision=revision)
    use_template = not no_chat_template and tokenizer.chat_template is not None
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if system and not use_template:
        print("note: --system is ignored without a chat template", file=sys.stderr)
    stats = GenerationStats()
    for piece in stream_generate(m, tokenizer, messages if use_template else prompt, max_tokens=max_tokens,
                                 stop=tuple(stop or ()), chat_template=use_template, context=context, stats=stats,
                                 **dataclasses.asdict(params)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose:
        print_stats(stats)


def print_stats(stats) -> None:
    from moecli.api import peak_memory_mb

    host, device = peak_memory_mb()
    lines = [
        f"prompt: {stats.prompt_tokens} tokens, {stats.prefill_tok_s:.1f} tok/s",
        f"generated: {stats.generated_tokens} tokens, {stats.decode_tok_s:.1f} tok/s (stopped by {stats.stopped_by})",
        f"time to first token: {stats.ttft_s:.3f} s (compile {stats.compile_s:.3f} s)",
        f"peak memory: host {host:.0f} MB" + (f", device {device:.0f} MB" if device is not None else ""),
    ]
    print("\n".join(lines), file=sys.stderr)
