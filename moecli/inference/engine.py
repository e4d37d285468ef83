"""A loaded model: its config, its parameters, and the compiled functions that run it.

    model = load_model("path/to/checkpoint", dtype="float32")
    logits = model(ids)                     # [batch, seq] -> float32 [batch, seq, vocab]
    logits, routing = model(ids, return_routing=True)
    cache = model.init_cache(batch=1, max_len=256)
    logits, cache = model.step(ids, cache)  # KV-cached: ids sit at positions cache.pos..
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moecli.checkpoints.loader import load_params
from moecli.checkpoints.families import load_config
from moecli.model.config import ModelConfig, QuantConfig
from moecli.errors import UsageError
from moecli.dtypes import FLOATS
from moecli.kernels import registry
from moecli.model.cache import Cache
from moecli.model.ops import Ops
from moecli.model.router import Routing
from moecli.model.sharding import make_mesh
from moecli.model.transformer import init_cache, transformed

DTYPES = FLOATS


def resolve_dtype(dtype: str):
    """"auto" is bfloat16 on GPU/TPU and float32 on CPU, where XLA's bf16 matmuls are ~20x slower."""
    if dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", f"choose one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class Model:
    """Parameters plus jitted forward functions. Build one with `load_model`.

    `ops` are the backend's implementations of the model's operations, chosen once here
    (`moecli.kernels.registry.select`) unless given; `model.ops.name` says which."""

    def __init__(self, config: ModelConfig, params: dict, source: str = "", mesh=None, ops: Ops | None = None,
                 load_notes: tuple[str, ...] = ()):
        self.config, self.params, self.source, self.mesh = config, params, source, mesh
        self.load_notes = load_notes  # what loading left out on purpose (`load_params`), for --verbose
        self.ops = ops = ops or registry.select()
        # The weights' float dtype, read off the embeddings: with quantized weights most leaves are
        # integers or float16 scales, and the first leaf may be one of them.
        self.dtype = params["transformer/embed"]["embeddings"].dtype
        # apply(params, ids, cache=None, expert_mask=None) -> (logits, cache, routing): to compose
        self.apply = apply = transformed(config, mesh, ops).apply
        self._forward = jax.jit(lambda p, ids: apply(p, ids)[::2])
        # The cache is donated: XLA updates it in place instead of copying it every step.
        self._step = jax.jit(lambda p, ids, cache: apply(p, ids, cache)[:2], donate_argnums=(2,))

    def __call__(self, ids, return_routing: bool = False) -> jax.Array | tuple[jax.Array, Routing]:
        """Full causal forward: int [batch, seq] -> float32 logits [batch, seq, vocab]."""
        logits, routing = self._forward(self.params, jnp.asarray(ids, jnp.int32))
        return (logits, routing) if return_routing else logits

    @property
    def cache_dtype(self):
        """The KV cache's dtype: the weights', unless the backend keeps it in float32 (the CPU's)."""
        return jnp.float32 if self.ops.float32_cache else self.dtype

    def init_cache(self, batch: int, max_len: int) -> Cache:
        return init_cache(self.config, batch, max_len, self.cache_dtype, self.ops.keys_transposed)

    def step(self, ids, cache: Cache) -> tuple[jax.Array, Cache]:
        """Run ids [batch, seq] at positions cache.pos.. through the cache (which is consumed)."""
        return self._step(self.params, jnp.asarray(ids, jnp.int32), cache)

    def with_config(self, **changes) -> "Model":
        """The same weights under changed settings, e.g. `with_config(capacity_factor=1.25)`."""
        return Model(self.config.replace(**changes), self.params, self.source, self.mesh, self.ops, self.load_notes)

    @functools.cached_property
    def n_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))


QUANTIZE = {"q8": 8, "q4": 4}


def quant_config(quantize: str | None) -> QuantConfig:
    """--quantize's value as a QuantConfig: None (or "none") keeps the weights as they are."""
    if quantize in (None, "", "none"):
        return QuantConfig()
    if quantize not in QUANTIZE:
        raise UsageError(f"unknown --quantize {quantize!r}", f"choose one of: {', '.join(QUANTIZE)}")
    return QuantConfig.preset(QUANTIZE[quantize])


def load_model(path: str | Path, dtype: str = "auto", capacity_factor: float = 0.0,
               devices: int | None = None, quantize: str | None = None) -> Model:
    """Load a Hugging Face-format checkpoint folder (config.json + safetensors).

    devices: how many devices to spread the experts over (None: all local accelerators, all
    devices of a multi-process run, or one CPU device); see `moecli.model.sharding`.
    quantize: "q8" or "q4" quantizes the experts and dense layers as they load (`moecli.model.quant`)."""
    config = load_config(path)
    if capacity_factor:
        config = config.replace(capacity_factor=capacity_factor)
    if quantize:
        config = config.replace(quant=quant_config(quantize))
    mesh = make_mesh(config, devices)
    notes: list[str] = []
    params = load_params(path, config, resolve_dtype(dtype), mesh, notes)
    return Model(config, params, source=str(path), mesh=mesh, load_notes=tuple(notes))
