"""moecli: run Mixture-of-Experts language models from a terminal, on JAX and dm-haiku.

    from moecli import load_model, generate_tokens, load, generate, stream_generate

The names are imported on first use, so `import moecli` (and the `moe` command's start) does
not pay for JAX until a model is needed.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Model": "moecli.inference.engine", "load_model": "moecli.inference.engine",
    "generate_tokens": "moecli.inference.decoder",
    "load": "moecli.inference.text", "generate": "moecli.inference.text", "stream_generate": "moecli.inference.text",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moecli' has no attribute {name!r}")
