"""Process-wide JAX settings moecli relies on."""
from __future__ import annotations

import os
from pathlib import Path

import jax


def cache_dir() -> Path:
    """moecli's cache folder: $MOECLI_CACHE, else $XDG_CACHE_HOME/moecli, else ~/.cache/moecli."""
    if os.environ.get("MOECLI_CACHE"):
        return Path(os.environ["MOECLI_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moecli"


def enable_compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache, so a second launch of `moe` loads compiled
    programs from disk instead of recompiling them (seconds saved per prefill bucket).
    Set MOECLI_NO_COMPILE_CACHE=1 to leave it off."""
    if os.environ.get("MOECLI_NO_COMPILE_CACHE"):
        return
    folder = cache_dir() / "jax"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # an unwritable home only costs compile time
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
