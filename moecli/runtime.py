"""Process-wide JAX settings moecli relies on."""
from __future__ import annotations

import os
from pathlib import Path

import jax

from moecli import env


def cache_dir() -> Path:
    """moecli's cache folder: $MOECLI_CACHE, else $XDG_CACHE_HOME/moecli, else ~/.cache/moecli."""
    if env.path("MOECLI_CACHE"):
        return env.path("MOECLI_CACHE")
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moecli"


def enable_compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache, so a second launch of `moe` loads compiled
    programs from disk instead of recompiling them (seconds saved per prefill bucket).
    Set MOECLI_NO_COMPILE_CACHE=1 to leave it off."""
    if env.switch("MOECLI_NO_COMPILE_CACHE"):
        return
    folder = cache_dir() / "jax"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # an unwritable home only costs compile time
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """Join a multi-process (multi-host) run through JAX's distributed runtime, so one mesh spans
    every process's devices. Flags win over the MOECLI_COORDINATOR, MOECLI_NUM_PROCESSES and
    MOECLI_PROCESS_ID environment variables; with neither, this is a single-process run.
    Every process runs the same command; CPU processes talk through gloo."""
    from moecli.errors import UsageError

    coordinator = coordinator or env.text("MOECLI_COORDINATOR")
    if not coordinator:
        return
    num_processes = num_processes if num_processes is not None else env.integer("MOECLI_NUM_PROCESSES")
    process_id = process_id if process_id is not None else env.integer("MOECLI_PROCESS_ID")
    if num_processes is None or process_id is None:
        raise UsageError("a multi-process run needs the process count and this process's id",
                         "pass --num-processes N --process-id I (or MOECLI_NUM_PROCESSES/MOECLI_PROCESS_ID)") from None
    if not 0 <= process_id < num_processes:
        raise UsageError(f"process id {process_id} is not in 0..{num_processes - 1}", "number processes from 0")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
