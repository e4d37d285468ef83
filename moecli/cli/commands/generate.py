"""`moe generate`: one prompt in, the reply streamed to stdout (a reasoning model's reasoning on
stderr, or hidden with --reasoning hide: `moecli.cli.reply.write_generated`)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from moecli.cli.app import command
from moecli.cli import options as opt
from moecli.errors import UsageError


@command("generate")
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt; - reads it from stdin."),
    model: Optional[str] = opt.Model, revision: Optional[str] = opt.Revision,
    max_tokens: int = opt.MaxTokens, temperature: float = opt.Temperature, top_p: float = opt.TopP,
    top_k: int = opt.TopK, min_p: float = opt.MinP, repetition_penalty: float = opt.RepetitionPenalty,
    seed: Optional[int] = opt.Seed, system: Optional[str] = opt.System, stop: Optional[List[str]] = opt.Stop,
    no_chat_template: bool = typer.Option(False, "--no-chat-template",
                                          help="Continue the prompt as raw text, even for a chat model."),
    dtype: str = opt.Dtype, context: Optional[int] = opt.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print timing and memory statistics to stderr."),
    routing_json: Optional[Path] = typer.Option(None, "--routing-json",
                                                help="Write every token's experts and gate weights per MoE layer here."),
    show_routing: bool = typer.Option(False, "--show-routing", help="Show the reply coloured by expert, and the "
                                                                    "per-layer expert load, on stderr."),
    routing_layer: Optional[int] = typer.Option(None, "--routing-layer", help="Layer for --show-routing's colours "
                                                                              "[default: the last MoE layer]."),
    mask: Optional[List[str]] = typer.Option(None, "--mask", help="Switch expert off, as LAYER:EXPERT; repeatable."),
    template_var: Optional[List[str]] = opt.TemplateVar,
    reasoning: str = opt.Reasoning, reasoning_effort: Optional[str] = opt.ReasoningEffort,
    quantize: Optional[str] = opt.Quantize, devices: Optional[int] = opt.Devices, coordinator: Optional[str] = opt.Coordinator,
    num_processes: Optional[int] = opt.NumProcesses, process_id: Optional[int] = opt.ProcessId,
) -> None:
    """Generate a reply to --prompt and stream it to stdout."""
    from moecli.cli.reply import write_generated
    from moecli.inference.text import (GenerationStats, context_full_note, decoder_for, load, note, prompt_ids,
                                       stream_segments)
    from moecli.inference.routing import parse_mask
    from moecli.text.reasoning import PLAIN, check_shown, reasoning_format

    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageError("the prompt is empty", "pass some text with --prompt (or - to read stdin)")
    params = opt.sampling(temperature, top_p, top_k, min_p, repetition_penalty, seed, max_tokens)
    variables = opt.reasoning_vars(opt.template_vars(template_var), reasoning_effort)
    show_reasoning = check_shown(reasoning)
    from moecli.runtime import init_distributed

    init_distributed(coordinator, num_processes, process_id)
    m, tokenizer = load(opt.model_source(model), dtype=dtype, revision=revision, devices=devices, quantize=quantize)
    use_template = not no_chat_template and tokenizer.chat_template is not None
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if system and not use_template:
        print("note: --system is ignored without a chat template", file=sys.stderr)
    ids = prompt_ids(tokenizer, messages if use_template else prompt, use_template, variables)
    decoder = decoder_for(m, len(ids), max_tokens, context)
    decoder.set_expert_mask(parse_mask(mask or [], m.config))
    decoder.capture_routing = bool(routing_json or show_routing)
    stats = GenerationStats()
    fmt = reasoning_format(tokenizer) if use_template else PLAIN
    reply, thought = write_generated(stream_segments(decoder, tokenizer, ids, params, fmt, stop=tuple(stop or ()),
                                                     stats=stats), show_reasoning)
    if thought and not reply.strip() and stats.stopped_by == "max tokens":
        note("the reply stopped while the model was still reasoning, before its answer; pass a larger --max-tokens")
    if reply.strip() or stats.stopped_by != "eos":
        sys.stdout.write("\n")
        sys.stdout.flush()
    elif not thought:  # a note on stderr, not an empty line on stdout
        note("the model ended its reply at once: a briefly trained model does this; train it longer")
    full = context_full_note(decoder, stats)
    if full:
        note(full)  # on stderr, under the reply
    if verbose:
        print_stats(stats, m, seed=params.seed)
    if decoder.capture_routing:
        report_routing(decoder, tokenizer, len(ids), routing_json, show_routing, routing_layer)


def report_routing(decoder, tokenizer, n_prompt: int, routing_json, show: bool, layer) -> None:
    """--routing-json and --show-routing: the prompt's and the reply's tokens, less the `</s>` the
    reply stopped at (the decoder fed it, but it is not part of the reply)."""
    import json

    from rich.console import Console

    from moecli.inference.routing import (moe_layer_numbers, routing_records, routing_views, token_pieces,
                                          token_view, without_stop_token)

    config = decoder.model.config
    if not any(config.moe_layers):
        print("note: this model has no MoE layers to show", file=sys.stderr)
        return
    n = n_prompt + without_stop_token(decoder.ids[n_prompt:], tokenizer)
    ids, routing = decoder.ids[:n], decoder.routing[:n]
    pieces = token_pieces(tokenizer, ids)
    if routing_json:
        records = routing_records(ids, pieces, routing, config, n_prompt)
        try:
            routing_json.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        except OSError as err:
            raise UsageError(f"cannot write {routing_json}: {err.strerror}",
                             "choose another --routing-json path") from None
    if show:
        console = Console(stderr=True)
        layer = moe_layer_numbers(config)[-1] if layer is None else layer
        colour = console.color_system is not None and not console.no_color
        console.print(token_view(pieces[n_prompt:], routing[n_prompt:], config, layer, colour))
        for view in routing_views(routing, config, "prompt + reply", decoder.model.mesh, decoder.model.dtype.itemsize):
            console.print(view)


def print_stats(stats, model, seed: int | None = None) -> None:
    from moecli.inference.text import peak_memory_mb, speed
    from moecli.kernels import registry

    host, device = peak_memory_mb()
    lines = [
        f"prompt: {stats.prompt_tokens} tokens, {speed(stats.prefill_tok_s)}",
        f"generated: {stats.generated_tokens} tokens, {speed(stats.decode_tok_s)} (stopped by {stats.stopped_by})",
        f"time to first token: {stats.ttft_s:.3f} s; compile {stats.compile_s:.3f} s, not counted in the speeds",
        *([f"seed: {seed} (--seed {seed} repeats this reply)"] if seed is not None else []),
        f"peak memory: host {host:.0f} MB" + (f", device {device:.0f} MB" if device is not None else ""),
        registry.describe(model.ops),
        *getattr(model, "load_notes", ()),  # tensors the checkpoint holds but moecli does not use
    ]
    print("\n".join(lines), file=sys.stderr)
