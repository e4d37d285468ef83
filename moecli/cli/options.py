"""Options shared by `moe generate` and `moe chat`, declared once."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import typer

if TYPE_CHECKING:
    from moecli.inference.sampling import SamplingParams

Model = typer.Option(None, "--model", "-m", help="Checkpoint folder or Hub repo id [default: the bundled model].")
Revision = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit) when --model is a repo id.")
MaxTokens = typer.Option(256, "--max-tokens", "-n", help="Most tokens to generate per reply.")
Temperature = typer.Option(0.7, "--temperature", "-t", help="Sampling temperature; 0 is greedy.")
TopP = typer.Option(0.95, "--top-p", help="Nucleus sampling: keep the smallest set with this much probability.")
TopK = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0: off).")
MinP = typer.Option(0.0, "--min-p", help="Drop tokens below min-p times the top probability (0: off).")
RepetitionPenalty = typer.Option(1.0, "--repetition-penalty", help="Penalise tokens already seen (1: off).")
Seed = typer.Option(None, "--seed", help="Random seed; the same seed and settings give the same output "
                                          "[default: a random one, shown by --verbose and /stats].")
System = typer.Option(None, "--system", help="System prompt (chat-template models).")
Stop = typer.Option(None, "--stop", help="Stop when this string appears (not printed); repeatable.")
Dtype = typer.Option("auto", "--dtype", help="Weights' dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16.")
Quantize = typer.Option(None, "--quantize", help="Quantize the weights as they load: q8 or q4 (int8 / int4 in groups "
                        "of 32; the router, norms and embeddings stay; under q4 the LM head keeps 8 bits).")
Devices = typer.Option(None, "--devices", help="Spread the experts over N devices [default: all accelerators; 1 on CPU].")
Coordinator = typer.Option(None, "--coordinator", help="Multi-host: the coordinator's HOST:PORT (run the same command "
                                                       "on every host) [env: MOECLI_COORDINATOR].")
NumProcesses = typer.Option(None, "--num-processes", help="Multi-host: how many processes [env: MOECLI_NUM_PROCESSES].")
ProcessId = typer.Option(None, "--process-id", help="Multi-host: this process's id, 0..N-1 [env: MOECLI_PROCESS_ID].")
TemplateVar = typer.Option(None, "--template-var", help="KEY=VALUE passed to the chat template (repeatable), "
                                                         "e.g. user_speaker=HAMLET for the bundled model.")
Context = typer.Option(None, "--context", help="Context window in tokens (capped at the model's maximum, "
                                                "with a notice) [default: the model's maximum, up to 4096].")
Reasoning = typer.Option("show", "--reasoning", help="show or hide a reasoning model's reasoning (gpt-oss's "
                         "analysis channel, <think>): dimmed in chat, on stderr in generate.")
ReasoningEffort = typer.Option(None, "--reasoning-effort", help="low, medium or high: the chat template's "
                               "reasoning_effort (gpt-oss) [default: the template's].")


def reasoning_vars(variables: dict[str, str], effort: Optional[str]) -> dict[str, str]:
    """--template-var's variables with --reasoning-effort's `reasoning_effort`, checked."""
    from moecli.text.reasoning import check_effort

    return {**variables, "reasoning_effort": check_effort(effort)} if effort is not None else variables


def sampling(temperature: float, top_p: float, top_k: int, min_p: float, repetition_penalty: float,
             seed: Optional[int], max_tokens: int) -> SamplingParams:
    """The flags as checked `SamplingParams`, with the seed drawn at random when --seed is not given."""
    from moecli.inference.sampling import SamplingParams  # imports JAX: only when a command runs

    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed, max_tokens=max_tokens)
    params.validate()
    return params.seeded()


def model_source(model: Optional[str]) -> str:
    from moecli.hub.bundled import bundled_model

    return model if model else str(bundled_model())


def template_vars(pairs: list[str] | None) -> dict[str, str]:
    """["user_speaker=HAMLET"] -> {"user_speaker": "HAMLET"}."""
    from moecli.errors import UsageError

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(f"bad --template-var {pair!r}", "write KEY=VALUE, e.g. user_speaker=HAMLET")
        out[key.strip()] = value
    return out
